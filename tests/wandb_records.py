"""Read back what W&B wrote offline: the run's .wandb file is a LevelDB-style log of protobuf Records."""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte); record headers are crc32 (4) + length (2) + type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path} is not a W&B transaction log")
    records, pos, pending = [], HEADER, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # the rest of a block too small for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            records.append(record)
            pending = b""
        elif kind in (FIRST, MIDDLE):
            pending += chunk
        elif kind == 0 and length == 0:
            break
    return records


def history_and_config(run_dir: Path) -> tuple[list[dict], dict]:
    """Every logged row (key -> value) and the run config, from the newest offline run under run_dir/wandb."""
    (log_file,) = sorted((run_dir / "wandb" / "latest-run").glob("*.wandb"))
    history, config = [], {}
    for record in read_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in updates})
    return history, config


def offline_segments(run_dir: Path) -> list[tuple[str, list[int]]]:
    """(run id, the `_step` of each history row) of every offline run folder under run_dir/wandb, in start order:
    what `wandb sync --id RUN_ID run_dir/wandb/offline-run-*` uploads, one job after the other."""
    segments = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        (log_file,) = folder.glob("*.wandb")
        run_id, steps = None, []
        for record in read_records(log_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
            elif kind == "history":
                steps.append(record.history.step.num)
        segments.append((run_id, steps))
    return segments
