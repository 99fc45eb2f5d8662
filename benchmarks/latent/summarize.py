"""Tabulate benchmarks/latent/: the latent cascade against its baseline (quality and speed, one run each)
and against the pixel fashion32 on the same seeds (benchmarks/quality/results.json, its `lowdiff-paper`
and `edm-35` points). Writes results.md and results.json beside this file; prints the table."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUALITY = HERE.parent / "quality" / "results.json"
LATENT, BASELINE = "fashion32-latent", "fashion32-latent-baseline"


def main() -> None:
    evals = {name: json.loads((HERE / f"{name}-eval.json").read_text()) for name in (LATENT, BASELINE)}
    bench = json.loads((HERE / "throughput-cpu.json").read_text())["results"]
    speed: dict[str, dict[str, dict]] = {}
    for r in bench:
        speed.setdefault(r["engine"], {})[r["config"]] = r
    n = evals[LATENT]["num_samples"]
    rows = [
        {
            "model": name,
            "kind": "latent, LowDiff 4×4→8×8" if name == LATENT else "latent, single stage 8×8",
            "nfe": e["nfe_per_stage"],
            "num_samples": e["num_samples"],
            "fd": e["fd"],
            "class_agreement": e["class_agreement"],
            "training_images": e["training"].get("training_images"),
            "throughput_img_s": {eng: round(m[name]["throughput_img_s"], 2) for eng, m in speed.items() if name in m},
            "decode_s_per_batch": {
                eng: round(next(s["latency_s_mean"] for s in m[name]["stages"] if s.get("stage") == "decode"), 3)
                for eng, m in speed.items()
                if name in m and any(s.get("stage") == "decode" for s in m[name]["stages"])
            },
        }
        for name, e in evals.items()
    ]
    quality = json.loads(QUALITY.read_text())
    for point in quality["points"]:
        if point["name"] in ("lowdiff-paper", "edm-35") and point.get("full", {}).get("num_samples") == n:
            rows.append({
                "model": "fashion32" if point["name"] == "lowdiff-paper" else "edm-fashion32",
                "kind": "pixel, LowDiff 8→16→32" if point["name"] == "lowdiff-paper" else "pixel, EDM 32×32",
                "nfe": [s["nfe"] for s in point["stages"]],
                "num_samples": n,
                "fd": point["full"]["fd"],
                "class_agreement": point["full"]["class_agreement"],
                "training_images": point.get("training_images"),
                "throughput_img_s": {f"{quality['engine']} (quality study run)": round(point["throughput_img_s"], 2)},
                "decode_s_per_batch": {},
            })  # fmt: skip
    ratios = {
        eng: round(m[LATENT]["throughput_img_s"] / m[BASELINE]["throughput_img_s"], 3)
        for eng, m in speed.items()
        if LATENT in m and BASELINE in m
    }
    floor_path = HERE / "ae-floor.json"
    floor = json.loads(floor_path.read_text()) if floor_path.is_file() else None
    result = {
        "autoencoder_floor": floor,
        "seeds": f"0…{n - 1}",
        "machine": bench[0]["device"],
        "threads": bench[0]["threads"],
        "batch": bench[0]["batch"],
        "rows": rows,
        "latent_cascade_vs_baseline_throughput": ratios,
    }
    (HERE / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Seeds {result['seeds']}; FD and class agreement in the committed classifier's features against the "
        "10,000 held-out Fashion-MNIST images; throughput at batch "
        f"{result['batch']}, {result['threads']} threads, {result['machine']}.",
        "",
        "| model | kind | NFE per stage | training images | FD | class agreement | images/s | decode s/batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tput = ", ".join(f"{v} ({k})" for k, v in r["throughput_img_s"].items())
        kimg = f"{r['training_images']:,}" if r["training_images"] else "?"
        dec = ", ".join(f"{v} ({k})" for k, v in r["decode_s_per_batch"].items()) or "–"
        lines.append(
            f"| {r['model']} | {r['kind']} | {'/'.join(map(str, r['nfe']))} | {kimg} | "
            f"{r['fd']:.2f} | {100 * r['class_agreement']:.1f} % | {tput} | {dec} |"
        )
    lines += ["", "Latent cascade ÷ latent baseline throughput, same run: "
              + ", ".join(f"{k} {v:.2f}×" for k, v in ratios.items())]  # fmt: skip
    if floor:
        lines.append(
            f"FD of {floor['num_images']:,} training images as they are: {floor['fd_real_training_images']:.2f}; "
            f"through the autoencoder (encode → decode): {floor['fd_reconstructed_training_images']:.2f}, the "
            "floor of any model that generates through this decoder."
        )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
