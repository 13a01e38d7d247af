import threading
import time

from common.memo import cached


def test_threads_asking_together_compute_once():
    calls: list[int] = []

    @cached(8)
    def slow(x: int) -> int:
        calls.append(x)
        time.sleep(0.05)
        return x * 2

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(slow(3))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [6] * 8 and calls == [3]
    assert slow(x=4) == 8 and calls == [3, 4]
