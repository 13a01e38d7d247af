"""Readers of each real format, on tiny files written by the tests."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from common.dataset import DataError
from common.loaders import COLUMNS, read_interactions, read_titles


def rows(loaded) -> list[tuple]:
    """(user, item, rating, timestamp, line) tuples, NaN ratings as None, for exact comparison."""
    f = loaded.frame
    return [(u, i, None if np.isnan(r) else r, t, n)
            for u, i, r, t, n in zip(f.user, f.item, f.rating, f.timestamp, f.line, strict=True)]


def test_ml100k_reads_fields_and_drops_malformed_lines(write):
    path = write("u.data", "196\t242\t3\t881250949\n"
                           "x\t302\t3\t891717742\n"       # non-numeric user
                           "22\t377\t1\n"                 # missing field
                           "244\t51\t2\t880606923\t9\n"   # surplus field
                           "166\t346\tone\t886397596\n"   # non-numeric rating
                           "\n"                           # blank: not a record
                           "298\t474\t4\t884182806\n")
    loaded = read_interactions("ml-100k", path)
    assert list(loaded.frame.columns) == COLUMNS
    assert rows(loaded) == [("196", "242", 3.0, 881250949.0, 1), ("298", "474", 4.0, 884182806.0, 7)]
    assert loaded.malformed == 4
    assert loaded.malformed_lines == (2, 3, 4, 5)
    assert loaded.source == str(path)


def test_malformed_sample_keeps_first_five_lines(write):
    lines = ["1\t2\t3\t4"] + [f"u{n}\t2\t3\t4" for n in range(8)]
    loaded = read_interactions("ml-100k", write("u.data", "\n".join(lines) + "\n"))
    assert loaded.malformed == 8
    assert loaded.malformed_lines == (2, 3, 4, 5, 6)


@pytest.mark.parametrize("gzipped", [False, True])
def test_ml1m_double_colon_plain_and_gzip(write, gzipped):
    text = ("1::1193::5::978300760\n"
            "1::661::3::978302109::7::8\n"   # two surplus fields
            "2::1357\n"                      # too short
            "2::1537::4::978299620\n")
    path = write("ratings.dat.gz", gzip.compress(text.encode())) if gzipped else write("ratings.dat", text)
    loaded = read_interactions("ml-1m", path)
    assert rows(loaded) == [("1", "1193", 5.0, 978300760.0, 1), ("2", "1537", 4.0, 978299620.0, 4)]
    assert loaded.malformed_lines == (2, 3)


def test_ml_latest_header_and_crlf(write):
    path = write("ratings.csv", "userId,movieId,rating,timestamp\r\n1,1,4.0,964982703\r\n"
                                "1,3,4.5,964981247\r\n1,six,4.0,964982224\r\n")
    loaded = read_interactions("ml-latest", path)
    assert rows(loaded) == [("1", "1", 4.0, 964982703.0, 2), ("1", "3", 4.5, 964981247.0, 3)]
    assert loaded.malformed_lines == (4,)


def test_ml_latest_wrong_header(write):
    path = write("ratings.csv", "user,movie,rating,time\n1,1,4.0,964982703\n")
    with pytest.raises(DataError, match="expected the header userId,movieId,rating,timestamp"):
        read_interactions("ml-latest", path)


def test_seq_positions_are_times_and_users_without_items_are_malformed(write):
    path = write("seq.txt", "u1 a b c\nu2\nu3 c a\n\nu1 d\n")
    loaded = read_interactions("seq", path)
    assert rows(loaded) == [("u1", "a", None, 0.0, 1), ("u1", "b", None, 1.0, 1), ("u1", "c", None, 2.0, 1),
                            ("u3", "c", None, 0.0, 3), ("u3", "a", None, 1.0, 3), ("u1", "d", None, 3.0, 5)]
    assert (loaded.malformed, loaded.malformed_lines) == (1, (2,))


def test_inter_uses_file_order(write):
    path = write("inter.txt", "1 10\n2 11\n1 12\n3\n")
    loaded = read_interactions("inter", path)
    assert rows(loaded) == [("1", "10", None, 0.0, 1), ("2", "11", None, 1.0, 2), ("1", "12", None, 2.0, 3)]
    assert loaded.malformed_lines == (4,)


def test_csv_named_columns_ratings_and_quotes(write):
    path = write("log.csv", 'when;who;what;stars;note\n'
                            '20;alice;"x;1";5;ok\n'
                            '10;bob;y;2;\n'
                            'late;bob;z;3;\n')          # non-numeric time
    loaded = read_interactions("csv", path, sep=";", user_col="who", item_col="what",
                               time_col="when", rating_col="stars")
    assert rows(loaded) == [("alice", "x;1", 5.0, 20.0, 2), ("bob", "y", 2.0, 10.0, 3)]
    assert loaded.malformed_lines == (4,)


def test_csv_tab_separator_iso_dates_and_no_rating(write):
    path = write("log.tsv", "user\titem\ttimestamp\nu\ta\t1970-01-01T00:01:00\nu\tb\t1970-01-02\n")
    loaded = read_interactions("csv", path, sep="\\t", user_col="user", item_col="item", time_col="timestamp")
    assert rows(loaded) == [("u", "a", None, 60.0, 2), ("u", "b", None, 86400.0, 3)]


def test_csv_without_time_column_uses_file_order(write):
    path = write("log.csv", "user,item\nu,b\nv,a\nu,a\n")
    loaded = read_interactions("csv", path, user_col="user", item_col="item")
    assert list(loaded.frame.timestamp) == [0.0, 1.0, 2.0]


def test_csv_missing_column_lists_columns(write):
    path = write("log.csv", "user_id,item_id\n1,2\n")
    with pytest.raises(DataError, match=r"no user column 'user'; columns found: user_id, item_id"):
        read_interactions("csv", path, user_col="user", item_col="item_id")


def test_csv_wrong_separator_hint(write):
    path = write("log.csv", "user;item\n1;2\n")
    with pytest.raises(DataError, match=r"columns found: user;item \(wrong csv-sep ','\?\)"):
        read_interactions("csv", path, user_col="user", item_col="item")


def test_titles_of_each_movielens_format(write):
    u_item = write("u.item", "1|Toy Story (1995)|01-Jan-1995||http://x|0|1\n2|Café (1996)|x||y|0|0\n",
                   encoding="latin-1")
    assert read_titles("ml-100k", u_item).to_dict() == {"1": "Toy Story (1995)", "2": "Café (1996)"}
    movies_dat = write("movies.dat", "1::Toy Story (1995)::Animation|Comedy\n2::Évasion (1990)::Drama\n",
                       encoding="latin-1")
    assert read_titles("ml-1m", movies_dat).to_dict() == {"1": "Toy Story (1995)", "2": "Évasion (1990)"}
    movies_csv = write("movies.csv", 'movieId,title,genres\r\n1,Toy Story (1995),Comedy\r\n'
                                     '11,"American President, The (1995)",Comedy|Drama\r\n')
    assert read_titles("ml-latest", movies_csv).to_dict() == {"1": "Toy Story (1995)",
                                                              "11": "American President, The (1995)"}


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="u.data: file not found"):
        read_interactions("ml-100k", tmp_path / "u.data")


def test_folder_is_not_a_file(tmp_path):
    with pytest.raises(DataError, match="not a file"):
        read_interactions("seq", tmp_path)


@pytest.mark.parametrize("fmt", ["ml-100k", "ml-1m", "ml-latest", "seq", "inter", "csv"])
def test_empty_file(write, fmt):
    with pytest.raises(DataError, match="file is empty"):
        read_interactions(fmt, write("empty.txt", ""))


def test_header_without_rows(write):
    with pytest.raises(DataError, match="no data rows after the header"):
        read_interactions("ml-latest", write("ratings.csv", "userId,movieId,rating,timestamp\n"))


def test_wrong_delimiter(write):
    path = write("u.data", "196,242,3,881250949\n186,302,3,891717742\n")
    with pytest.raises(DataError, match=r"expected 4 tab-separated fields per line, line 1 has 1 "
                                        r"\('196,242,3,881250949'\); wrong delimiter\?"):
        read_interactions("ml-100k", path)


def test_non_numeric_ids_leave_no_valid_row(write):
    path = write("u.data", "a\tb\t3\t881250949\nc\td\t3\t891717742\n")
    with pytest.raises(DataError, match=r"no valid row among 2 lines \(expected numeric user id"
                                        r".*first bad lines: 1, 2"):
        read_interactions("ml-100k", path)


def test_error_messages_are_one_line(write):
    for fmt, text in [("ml-100k", "1,2,3,4\n"), ("ml-100k", "a\tb\t1\t2\n"), ("seq", "u1\nu2\n")]:
        with pytest.raises(DataError) as error:
            read_interactions(fmt, write("f.txt", text))
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("fmt", ["seq", "inter"])
@pytest.mark.parametrize("name, text, right", [
    ("u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n", "ml-100k"),
    ("ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n", "ml-1m"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n", "ml-latest"),
])
def test_ratings_file_given_as_a_sequence_format_names_the_right_one(write, fmt, name, text, right):
    with pytest.raises(DataError) as error:
        read_interactions(fmt, write(name, text))
    message = str(error.value)
    assert "\n" not in message and f"--data-format {right}" in message and f"not {fmt}" in message


def test_sequences_that_only_resemble_ratings_are_read(write):
    # Space-separated (not a ratings separator), and on tabs a "rating" of 30: both are sequences.
    loaded = read_interactions("seq", write("s.txt", "1 5 3 881250949\n2 7 30 891717742\n3 4 2 5 6\n"))
    assert len(loaded.frame) == 10
    tabbed = read_interactions("seq", write("t.txt", "1\t5\t3\t881250949\n2\t7\t30\t891717742\n"))
    assert len(tabbed.frame) == 6  # item 30 is no rating: this is a sequence file


@pytest.mark.parametrize("fmt, text", [("seq", "u1 1 2 3\nu2 1 {big} 3\n"), ("inter", "u1 1\nu1 {big}\n"),
                                       ("ml-100k", "1\t{big}\t3\t881250949\n")])
def test_huge_id_is_refused_before_numpy_sizes_every_id_by_it(write, fmt, text):
    big = "7" * 2_000_000  # as a fixed-width numpy string, every id would take 8 MB
    with pytest.raises(DataError, match=r"^\S+: line \d: item id of 2,000,000 characters \(ids have at most 1,024\)"):
        read_interactions(fmt, write("data.txt", text.format(big=big)))


def test_long_titles_are_cut(write):
    titles = read_titles("ml-100k", write("u.item", f"1|{'T' * 5000}|01-Jan-1995\n"))
    assert len(titles["1"]) == 1024
