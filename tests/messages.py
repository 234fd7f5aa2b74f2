"""Build Flower Messages outside a running ServerApp (which normally supplies the run id)."""

from flwr.app import Message, MessageType, Metadata, RecordDict
from flwr.app.message.message import make_message


def message(content: RecordDict, *, src: int = 2, dst: int = 1, message_type: str = MessageType.TRAIN) -> Message:
    metadata = Metadata(
        run_id=1, message_id="", src_node_id=src, dst_node_id=dst, reply_to_message_id="",
        group_id="1", created_at=0.0, ttl=60.0, message_type=message_type,
    )
    return make_message(metadata=metadata, content=content)
