"""Read W&B's offline run files (``run-<id>.wandb``) with wandb's own protobufs, no server.

The file is a 7-byte header (``:W&B``, magic 0xBEE1, version 0) followed by LevelDB-log
framing: 32 KiB blocks of chunks ``[crc32: 4][length: 2][type: 1][data]``, where a record is
one FULL chunk or a FIRST, MIDDLE…, LAST run, and a block tail shorter than a chunk header is
zero padding. Each record is a ``wandb.proto.wandb_internal_pb2.Record``.

Used by the sweep report (``compare``) and by the tests that check what a run logged.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

_HEADER = b":W&B" + struct.pack("<H", 0xBEE1) + b"\x00"
_BLOCK = 32 * 1024
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class RecordError(ValueError):
    """A .wandb file that is not a W&B transaction log, or whose framing is corrupt."""


def _payloads(data: bytes, path) -> list[bytes]:
    if not data.startswith(_HEADER):
        raise RecordError(f"{path} is not a W&B run file (header {data[:7]!r})")
    out, pending, pos = [], None, len(_HEADER)
    while pos + _CHUNK_HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _CHUNK_HEADER:  # zero padding at the end of a block
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _CHUNK_HEADER])
        if crc == 0 and length == 0 and kind == 0:  # a preallocated, never-written tail
            break
        chunk = data[pos + _CHUNK_HEADER:pos + _CHUNK_HEADER + length]
        if len(chunk) < length:
            break  # a run still being written: its last record is incomplete
        if zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != crc:
            raise RecordError(f"{path}: bad checksum at byte {pos}")
        pos += _CHUNK_HEADER + length
        if kind == _FULL:
            out.append(chunk)
        elif kind == _FIRST:
            pending = bytearray(chunk)
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending += chunk
            if kind == _LAST:
                out.append(bytes(pending))
                pending = None
        else:
            raise RecordError(f"{path}: unexpected chunk type {kind} at byte {pos}")
    return out


def read_records(path) -> list:
    """Every record of one ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    records = []
    for payload in _payloads(path.read_bytes(), path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        records.append(rec)
    return records


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_run(run_dir) -> dict:
    """One offline run folder (``.../wandb/offline-run-*``) as plain Python:
    ``{"id", "name", "group", "config", "history": [{key: value}], "summary", "exit_code",
    "metrics": {name: step_metric}}``. History values are decoded JSON (images are dicts with
    ``_type`` "images/separated")."""
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("*.wandb"))
    if not files:
        raise RecordError(f"{run_dir} holds no .wandb file")
    out = {"id": None, "name": None, "group": None, "config": {}, "history": [],
           "summary": {}, "exit_code": None, "metrics": {}}
    for rec in (r for f in files for r in read_records(f)):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(id=rec.run.run_id, name=rec.run.display_name, group=rec.run.run_group)
            for item in rec.run.config.update:
                out["config"][_key(item)] = _value(json.loads(item.value_json))
        elif kind == "config":
            for item in rec.config.update:
                out["config"][_key(item)] = _value(json.loads(item.value_json))
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][_key(item)] = json.loads(item.value_json)
        elif kind == "metric" and (rec.metric.name or rec.metric.glob_name):
            out["metrics"][rec.metric.name or rec.metric.glob_name] = rec.metric.step_metric
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def _value(v):
    """W&B stores each config entry as {"value": ..., "desc": ...}."""
    return v["value"] if isinstance(v, dict) and set(v) <= {"value", "desc"} and "value" in v else v


def find_runs(root) -> list[Path]:
    """The offline (or synced online) run folders under ``root``, oldest first."""
    runs = [p for p in Path(root).rglob("*run-*") if p.is_dir() and list(p.glob("*.wandb"))]
    return sorted(runs, key=lambda p: p.name)
