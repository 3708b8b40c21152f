"""Reading the scalars s3prl's runners log with tensorboardX, without tensorboard installed."""

from __future__ import annotations

import struct
from collections import defaultdict
from pathlib import Path


def read_scalars(expdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every events file in `expdir`, sorted by step. An incomplete
    last record (a killed writer) is ignored."""
    from tensorboardX.proto import event_pb2

    scalars = defaultdict(list)
    for path in sorted(Path(expdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):
            # TFRecord framing: u64 length, u32 length-crc, payload, u32 payload-crc.
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            if offset + 12 + length + 4 > len(data):
                break  # the last record of a killed run, cut short: what was written before it stands
            event = event_pb2.Event()
            event.ParseFromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars[value.tag].append((int(event.step), float(value.simple_value)))
    return {tag: sorted(points) for tag, points in scalars.items()}
