"""Compare pretrained backbones on your data, as the book compared five networks: every
backbone embeds the same held-out images untrained, and one row per backbone holds its
quality, size and speeds. What the columns mean and where they are written: the command,
`mltrain compare` (`mltrain.commands.compare`)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

OFFLINE = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
COLUMNS = ["backbone", "precision@1", "MAP@R", "book score", "length", "parameters", "img/s",
           "train img/s", "weights"]  # fmt: skip


def train_speed(cfg: Any, steps: int, batch: int = 16) -> float | None:
    """Training images per second of the config's model (its frozen stages, amp and fp32
    depthwise) on random images: forward, backward and an AdamW step, after one warm-up."""
    import torch

    from mltrain.model.network import build_model, data_config
    from mltrain.model.precision import depthwise_in_fp32
    from mltrain.runtime import Runtime, autocast

    if steps < 1:
        return None
    runtime = Runtime.from_config(cfg)
    model = build_model(cfg.model).to(runtime.device).train()
    if cfg.train.depthwise_fp32:
        depthwise_in_fp32(model)
    x = torch.randn(batch, *data_config(model, cfg.model)["input_size"], device=runtime.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    start = 0.0
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        with autocast(runtime.device, runtime.train_amp):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return batch * steps / (time.perf_counter() - start)


def _weights(cfg: Any, name: str, overrides: Sequence[str]) -> tuple[list[str], str]:
    """Overrides that give `name` weights it can load, and what they are."""
    from mltrain.model.network import OFFLINE_WEIGHTS

    pretrained = cfg.model.pretrained
    if pretrained == "offline" and name not in OFFLINE_WEIGHTS:
        return ["model.pretrained=false"], "random"
    labels = {True: "hub", False: "random", "offline": "offline"}
    return [], labels.get(pretrained, str(pretrained)) if isinstance(pretrained, bool | str) else ""


def compare(
    config: str | None, backbones: Sequence[str], overrides: Sequence[str], train_steps: int = 0
) -> list[dict]:
    """One row per backbone (see the module docstring); the data is prepared once."""
    from mltrain.config import load_config
    from mltrain.data.pipeline import prepare_data
    from mltrain.evaluation.metrics import book_accuracy, retrieval_metrics
    from mltrain.inference.embedder import embedder_from_backbone

    rows: list[dict[str, Any]] = []
    data = None
    for name in backbones:
        untrained = ["model.frozen_stages=0", "model.trainable_stages=null",
                     "train.cache_frozen=false"]  # fmt: skip
        cfg = load_config(config, [*overrides, f"model.backbone={name}", *untrained])
        fix, weights = _weights(cfg, name, overrides)
        cfg = load_config(config, [*overrides, f"model.backbone={name}", *untrained, *fix])
        data = data or prepare_data(cfg)
        held = data.split.heldout
        labels = data.folder.labels[held]
        embedder = embedder_from_backbone(cfg)
        start = time.perf_counter()
        emb = embedder.embed(data.paths(held), labels, desc=f"{name} embeddings")
        seconds = time.perf_counter() - start
        scores, _ = retrieval_metrics(emb, labels, metric=cfg.eval.metric, ks=[1])
        rows.append({
            "backbone": name,
            "precision_at_1": scores["precision_at_1"],
            "map_at_r": scores["map_at_r"],
            "book_score": book_accuracy(emb, labels) if len(labels) > 4 else None,
            "embedding_dim": int(emb.shape[1]),
            "parameters": sum(p.numel() for p in embedder.model.parameters()),
            "images_per_s": len(labels) / seconds,
            "train_images_per_s": train_speed(
                load_config(config, [*overrides, f"model.backbone={name}",
                                     "model.pretrained=false"]),  # fmt: skip
                train_steps,
            ),
            "weights": weights,
            "images": len(labels),
        })  # fmt: skip
    return rows


def markdown(rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---" + "|---:" * (len(COLUMNS) - 1) + "|"]
    for r in rows:
        book = "–" if r["book_score"] is None else f"{r['book_score']:.4f}"
        cells = [r["backbone"], f"{r['precision_at_1']:.4f}", f"{r['map_at_r']:.4f}", book,
                 str(r["embedding_dim"]), f"{r['parameters'] / 1e6:.1f} M",
                 f"{r['images_per_s']:.1f}", _speed(r.get("train_images_per_s")),
                 r.get("weights", "")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _speed(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def write_comparison(rows: Sequence[dict], out: Path) -> str:
    """compare.md (the table) and compare.json (every row) in `out`; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    (out / "compare.md").write_text(table + "\n")
    (out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    return table
