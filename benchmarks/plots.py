"""Latency and visual tokens against input resolution, one line per family (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

FAMILIES = {"mra": ("LLaVA-HR (MRA, ConvNeXt-L)", "o-"), "mra-x": ("LLaVA-HR-X (MRA, ConvNeXt-XXL)", "s"),
            "plain": ("plain CLIP ViT-L/14 (LLaVA-1.5 way)", "^--")}


def _family(row: dict) -> str:
    return "mra-x" if row["family"] == "mra" and row.get("llm") == "13b" else row["family"]


def _plot(rows: list[dict], key: str, ylabel: str, title: str, path: Path, log_y: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for fam, (label, style) in FAMILIES.items():
        pts = sorted((r["image_size"], r[key]) for r in rows if _family(r) == fam)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, markersize=7)
            for x, y in pts:
                ax.annotate(f"{y:,.0f}" if key == "tokens" or y >= 10 else f"{y:.2g}", (x, y), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
    ax.set_xlabel("input resolution (px)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(rows: list[dict], out: Path, backend: str) -> list[Path]:
    return [
        _plot(rows, "vision_s", f"vision latency, s ({backend}, batch 1)", "Vision latency vs resolution",
              out / "latency_vs_resolution.png", log_y=True),
        _plot(rows, "tokens", "visual tokens fed to the LLM", "Visual tokens vs resolution",
              out / "tokens_vs_resolution.png", log_y=True),
        _plot(rows, "ttft_own_llm_s_extrapolated", "time to first token, s (7B / 13B LLM, extrapolated)",
              "Time to first token vs resolution", out / "ttft_vs_resolution.png", log_y=True),
    ]
