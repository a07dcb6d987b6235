#!/usr/bin/env python3
"""Joins gpu_selection_bench's JSON with the peer's (vLLM's Triton indexer, ../shared/peer) from
the same call into one table: ours, the peer's, the speed ratio, our share of the floor measured in
the same process, and the PERFORMANCE.md target. The targets are defined here and nowhere else.

  compare_with_peer.py --ours blocksel.json --peer vllm_peer.json --commit C --date D \
      --out_json OUT.json --out_md OUT.md
"""
import argparse
import json


# PERFORMANCE.md's kernel targets, by our shape name: ("us", limit), ("floor_pct", minimum), or
# ("ratio", other shape, maximum ratio of our times).
TARGETS = {
    "decode bf16 B=1 L=8K Q=1": ("us", 6),
    "decode bf16 B=1 L=128K Q=1": ("us", 12),
    "decode bf16 B=8 L=32K Q=1": ("us", 18),
    "decode bf16 B=32 L=128K Q=1": ("floor_pct", 92),
    "decode bf16 B=64 L=32K Q=1": ("floor_pct", 92),
    "decode bf16 B=256 L=8K Q=1": ("floor_pct", 92),
    "decode bf16 B=4 L=1M Q=1": ("floor_pct", 92),
    "decode bf16 B=32 L=128K Q=4": ("ratio", "decode bf16 B=32 L=128K Q=1", 1.1),
    "decode fp8 B=32 L=128K Q=1": ("ratio", "decode bf16 B=32 L=128K Q=1", 0.55),
    "prefill bf16 T=8K P=0": ("us", 100),
    "prefill bf16 T=8K P=120K": ("us", 1900),
    "prefill bf16 T=32K P=0": ("us", 1000),
    "prefill bf16 T=512 P=128K": ("us", 400),
    "prefill bf16 T=2K P=256K": ("us", 1300),
}


def peer_key(record):
    if record["kind"] == "decode":
        return f"decode B={record['batch']} L={record['context']} Q={record['rows']}"
    prefix = record["context"] - record["rows"]
    return f"prefill T={record['rows']} P={prefix}"


def peer_us(peer, record):
    if record["dtype"] != "bf16":
        return None  # the peer has no fp8 path on NVIDIA
    entry = peer.get(peer_key(record))
    if entry is None:
        return None
    us = entry["us_rotated"] if record["kind"] == "decode" else entry["score_us"] + entry["topk_us"]
    return None if us != us else us  # NaN: the peer ran out of memory


def main():
    ap = argparse.ArgumentParser()
    for flag in ("--ours", "--peer", "--commit", "--date", "--out_json", "--out_md"):
        ap.add_argument(flag, required=True)
    args = ap.parse_args()
    ours = json.load(open(args.ours))
    peer = json.load(open(args.peer))
    # A prefill shape may appear twice (unsplit, then the key split the backend picks): the
    # backend's choice is the last record.
    shapes = {}
    for record in ours["shapes"]:
        shapes[record["name"]] = record
    rows = []
    for name, record in shapes.items():
        theirs = peer_us(peer, record)
        target = TARGETS.get(name)
        floor_pct = 100.0 * record["floor_us"] / record["us"]
        met = None
        target_text = ""
        if target is not None:
            if target[0] == "us":
                met, target_text = record["us"] <= target[1], f"<= {target[1]} us"
            elif target[0] == "floor_pct":
                met, target_text = floor_pct >= target[1], f">= {target[1]}% of floor"
            elif target[1] in shapes:
                limit = target[2] * shapes[target[1]]["us"]
                met, target_text = record["us"] <= limit, f"<= {target[2]}x {target[1]} ({limit:.1f} us)"
        rows.append({
            "shape": name,
            "blocksel_us": round(record["us"], 2),
            "peer_us": None if theirs is None else round(theirs, 2),
            "speed_vs_peer": None if theirs is None else round(theirs / record["us"], 3),
            "floor_us": round(record["floor_us"], 2),
            "floor_pct": round(floor_pct, 1),
            "key_splits": record["key_splits"],
            "target": target_text,
            "target_met": met,
        })
    result = {
        "card": ours["device"], "date": args.date, "commit": args.commit,
        "read_gbps": ours["read_gbps"], "bf16_tflops": ours["bf16_tflops"],
        "graph_floor_us": ours["graph_floor_us"], "peer": "vLLM Triton MiniMax M3 indexer, 0a1c5034f",
        "shapes": rows,
    }
    json.dump(result, open(args.out_json, "w"), indent=1)
    lines = [
        f"{ours['device']}, {args.date}, commit {args.commit}: read {ours['read_gbps']:.0f} GB/s, "
        f"bf16 {ours['bf16_tflops']:.0f} TFLOP/s, graph replay {ours['graph_floor_us'][0]:.1f} us "
        f"(1 kernel) / {ours['graph_floor_us'][1]:.1f} us (2), all measured in this call.",
        "",
        "| shape | blocksel | vLLM | blocksel speed / vLLM | % of floor | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        theirs = "none" if row["peer_us"] is None else f"{row['peer_us']:.1f} us"
        ratio = "" if row["speed_vs_peer"] is None else f"{row['speed_vs_peer']:.2f}x"
        met = "" if row["target_met"] is None else ("yes" if row["target_met"] else "no")
        lines.append(f"| {row['shape']} | {row['blocksel_us']:.1f} us | {theirs} | {ratio} | "
                     f"{row['floor_pct']:.1f}% | {row['target']} | {met} |")
    open(args.out_md, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
