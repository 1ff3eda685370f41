"""Oracle: read an m3d volume shard and a sample shard with pyarrow (independently of the Rust reader)
and print what a Python consumer sees, as JSON on stdout.

usage: read_shards.py VOLUME_SHARD SAMPLE_SHARD
"""
import json
import sys
import zlib

import numpy as np
import pyarrow.parquet as pq


def file_meta(path):
    md = pq.ParquetFile(path).metadata
    kv = {k.decode(): v.decode() for k, v in (md.metadata or {}).items() if k.decode().startswith("m3d.")}
    return md, kv


def decode_image(buf, dtype, n):
    if dtype == "u8":
        return (np.frombuffer(buf, dtype=np.uint8).astype(np.float32) / np.float32(255.0)).tolist()
    if dtype == "f16":
        return np.frombuffer(buf, dtype="<f2").astype(np.float32).tolist()
    if dtype == "f32":
        return np.frombuffer(buf, dtype="<f4").tolist()
    raise ValueError(dtype)


def volumes(path):
    md, kv = file_meta(path)
    table = pq.read_table(path)
    rows = []
    for r in table.to_pylist():
        shape = r["shape"]
        n = int(np.prod(shape))
        spatial = int(np.prod(shape[1:]))
        masks = []
        for m in r["masks"]:
            bits = np.frombuffer(m["bits"], dtype=np.uint8)
            if len(bits) == 0:
                unpacked = np.zeros(spatial, dtype=np.uint8)
            else:
                unpacked = np.unpackbits(bits, bitorder="little")[:spatial]
            masks.append({
                "class_index": m["class_index"],
                "label": m["label"],
                "voxels": m["voxels"],
                "ones": int(unpacked.sum()),
                "mask": unpacked.tolist(),
            })
        rows.append({
            "volume_id": r["volume_id"],
            "dataset": r["dataset"],
            "source": r["source"],
            "shape": shape,
            "dtype": r["dtype"],
            "crc_ok": (zlib.crc32(r["image"]) & 0xFFFFFFFF) == r["image_crc32"],
            "image": decode_image(r["image"], r["dtype"], n),
            "masks": masks,
        })
    return {
        "columns": table.schema.names,
        "types": {f.name: str(f.type) for f in table.schema},
        "metadata": kv,
        "num_row_groups": md.num_row_groups,
        "rows": rows,
    }


def samples(path):
    md, kv = file_meta(path)
    table = pq.read_table(path)
    return {
        "columns": table.schema.names,
        "types": {f.name: str(f.type) for f in table.schema},
        "metadata": kv,
        "rows": table.to_pylist(),
    }


def main():
    out = {"volumes": volumes(sys.argv[1]), "samples": samples(sys.argv[2])}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
