"""The fedrec ClientApp: local DP-SGD on this client's own users, weights out, nothing else.

A train message gets the client's budget check, local training and a reply with the new weights,
the number of training windows, the train loss and the cumulative ε; an evaluate message gets the
global model's metrics on the client's own validation targets (`client.local` does both).

Importing this module costs little more than importing Flower: torch, Opacus and the data stack
load with the first message. Flower's stock launcher starts a fresh process per message, so a
process that only answers what it was asked pays for no more; fedrec's warm launcher
(`client.warm`) imports them once, before it forks a process per message.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.secagg import secure_aggregation_mod

app = ClientApp()


@app.train(mods=[secure_aggregation_mod])
def train_round(msg: Message, context: Context) -> Message:
    from client import local

    return local.train(msg, context)


@app.evaluate()
def evaluate_round(msg: Message, context: Context) -> Message:
    from client import local

    return local.evaluate(msg, context)
