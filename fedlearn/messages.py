"""Names of the records fedlearn's ServerApp and ClientApp exchange, in one place.

Flower's strategies use ``arrays``, ``metrics`` and ``config``; we add ``node``, a
ConfigRecord in which a client says which data partition it holds.
"""

NODE_RECORD = "node"
PARTITION_KEY = "partition-id"
