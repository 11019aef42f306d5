"""Keyed LoRA dropout's cost: a LoRA layer vs nn.Dropout and none; the demo step with and without it.

Layer part, at the demo's and MiniCPM-2.4B's LoRA input widths (fp32, ``--threads``, best of ``--repeats``,
every variant timed in turn in each round, so a busy machine slows them alike): the base projection's matmul,
the keyed mask applied by the reference (int64 torch ops of the input's size) and by the fused kernel, and
``nn.Dropout``, forward only; then one peft LoRA layer (r 16) forward+backward with keyed dropout, with
``nn.Dropout`` and with none. Bar: keyed <= 1.2x nn.Dropout.

Step part: the demo config (launch/configs/demo-smollm2.json) trained through the launcher on ``--nproc`` ranks,
as configured against ``lora_dropout`` 0, alternating runs (ABBA): the ratio of the arms' mean tokens/s (the
trainer's own, steps after the first; this machine's run-to-run drift is why one run per arm says little), with
each ABBA pair's ratio and the best runs' ratio, and rank 0's peak memory (resident set) in each arm's best run.
Then one shorter run per arm with glibc giving every freed block of 128 KiB or more back to the system
(MALLOC_MMAP_THRESHOLD_), so that the resident set follows the live tensors instead of what the allocator keeps
(slower: those runs time nothing). Bars: >= 0.95x the mean tokens/s, live peak memory within 2% (the peak a GPU
run reports, max_memory_allocated, counts live tensors too). Also the model FLOP/s (benchmarks/step_throughput.py's
formula, s = max_seq_length) against an fp32 matmul measured here on as many threads as there are ranks.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.ablation import BASE_CONFIG, TRAIN_DATA
from benchmarks.common import benchmark_parser, write_result
from benchmarks.launched import measure
from benchmarks.step_throughput import flops_per_token, matmul_tflops
from debater.keyed_dropout import KeyedDropout, TextKeys, install_keyed_dropout

# name -> (LoRA input [texts, positions, features], base projection's output width)
SHAPES = {"demo attention input": ((24, 64, 576), 576), "demo down-projection input": ((24, 64, 1536), 576),
          "MiniCPM width": ((4, 512, 2304), 2304), "MiniCPM down-projection input": ((4, 512, 5760), 2304)}
LAYER_BAR, STEP_BAR, MEMORY_BAR = 1.2, 0.95, 0.02
# for the launched ranks: glibc mmaps every block >= 128 KiB, so unmaps it when freed
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def best_of(variants: dict, repeats: int) -> dict[str, float]:
    """Milliseconds of each callable, the best of ``repeats`` rounds that run every variant once (after one
    untimed round)."""
    best = dict.fromkeys(variants, float("inf"))
    for round_number in range(repeats + 1):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            if round_number:
                best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return {name: round(ms, 2) for name, ms in best.items()}


def lora_layer(width_in: int, width_out: int, dropout: str, p: float, text_keys: TextKeys) -> nn.Module:
    """A frozen projection with a peft LoRA adapter (r 16), its dropout ``none``, ``nn.Dropout`` or ``keyed``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(width_in, width_out, bias=False)),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0 if dropout == "none" else p,
                                      target_modules=["0"]))
    if dropout == "keyed":
        install_keyed_dropout(model, seed=42, text_keys=text_keys)
    return model.base_model.model.train()


def layer_costs(shape: tuple[int, int, int], width_out: int, p: float, repeats: int) -> dict:
    text_keys = TextKeys()
    hidden = torch.randn(shape, requires_grad=True)
    upstream = torch.randn(*shape[:2], width_out)
    keys = torch.arange(shape[0]) * 3 + 1
    keyed = KeyedDropout(p, salt=12345, text_keys=text_keys).train()
    plain = nn.Dropout(p).train()
    weight = torch.randn(width_out, shape[2])
    layers = {name: lora_layer(shape[2], width_out, name, p, text_keys) for name in ("none", "nn.Dropout", "keyed")}

    def forward_backward(layer: nn.Module):
        def run():
            hidden.grad = None
            layer(hidden).backward(upstream)
        return run

    with text_keys.use(keys):
        with torch.no_grad():
            alone = best_of({"base matmul": lambda: hidden @ weight.T,
                             "keyed reference": lambda: hidden * keyed.keep_mask(keys, *shape[1:]).float() / (1 - p),
                             "keyed fused": lambda: keyed(hidden), "nn.Dropout": lambda: plain(hidden)}, repeats)
        layer = best_of({name: forward_backward(module) for name, module in layers.items()}, repeats)
    ratio = layer["keyed"] / layer["nn.Dropout"]
    return {"input": list(shape), "output_width": width_out, "mask_alone_ms": alone, "layer_forward_backward_ms": layer,
            "keyed_vs_nn_dropout": round(ratio, 3), "keyed_vs_none": round(layer["keyed"] / layer["none"], 3),
            "ok": ratio <= LAYER_BAR}


def lora_params(model_config, r: int) -> int:
    """LoRA's weights on every linear layer of a Llama decoder layer: r x (in + out) each."""
    d, inner = model_config.hidden_size, model_config.intermediate_size
    kv = model_config.num_key_value_heads * (d // model_config.num_attention_heads)
    return r * model_config.num_hidden_layers * (2 * d + 2 * (d + kv) + 2 * d + 3 * (d + inner))


def arm_folder(out: Path, p: float, name: str) -> Path:
    return out / f"{'dropout' if p else 'none'}-{name}"


def train_arm(args, demo: dict, data: str, run: Path, p: float, steps: int, env: dict | None = None) -> dict:
    """One launched run of the demo config with ``lora_dropout`` p for ``steps`` steps, measured."""
    config = {**demo, "output_dir": str(run), "dataset_file_path": data, "lora_dropout": p,
              "stop_after_n_steps": steps, "logging_steps": 1, "save_steps": steps}
    measured = measure(run, config, args.nproc, env)
    if "error" in measured:
        raise SystemExit(f"{run.name}: {measured['error']}")
    print(run.name, measured, flush=True)
    return measured


def step_costs(args) -> dict:
    """The demo config launched as configured and with lora_dropout 0, alternating; the arms' mean and best
    runs; then each arm's live peak memory."""
    from transformers import AutoConfig

    demo = json.loads(BASE_CONFIG.read_text())
    arms = {f"lora_dropout {demo['lora_dropout']}": demo["lora_dropout"], "lora_dropout 0": 0.0}
    data, runs = str(args.data), {arm: [] for arm in arms}
    for repeat in range(args.step_repeats):
        order = list(arms.items()) if repeat % 2 == 0 else list(arms.items())[::-1]  # ABBA: drift hits both arms
        for arm, p in order:
            run = arm_folder(args.out, p, str(repeat))
            runs[arm].append(train_arm(args, demo, data, run, p, args.steps))
            if (run / "preprocessed").is_dir():  # raw data: tokenized once, by the first run
                data = str(run / "preprocessed")
    best = {arm: max(measured, key=lambda m: m["tokens_per_s"]) for arm, measured in runs.items()}
    (dropout, none) = best.values()
    means = {arm: statistics.mean(m["tokens_per_s"] for m in measured) for arm, measured in runs.items()}
    mean_dropout, mean_none = means.values()
    (dropout_runs, none_runs) = runs.values()
    pair_ratios = [round(a["tokens_per_s"] / b["tokens_per_s"], 3) for a, b in zip(dropout_runs, none_runs)]
    live = {arm: train_arm(args, demo, data, arm_folder(args.out, p, "live-memory"), p, args.memory_steps,
                           LIVE_MEMORY_ENV)["peak_mb"] for arm, p in arms.items()}
    torch.set_num_threads(args.nproc)  # the cores the ranks ran on
    peak = matmul_tflops(torch.device("cpu"), torch.float32, 2048)
    flops = flops_per_token(AutoConfig.from_pretrained(demo["model_name_or_path"]),
                            lora_params(AutoConfig.from_pretrained(demo["model_name_or_path"]), demo["lora_r"]),
                            demo["max_seq_length"])
    model_tflops = flops["model"] * mean_dropout / 1e12
    speed, memory = mean_dropout / mean_none, dropout["peak_mb"] / none["peak_mb"] - 1
    (live_dropout, live_none) = live.values()
    live_change = live_dropout / live_none - 1
    return {"nproc": args.nproc, "steps": args.steps, "runs": runs, "best": best,
            "mean_tokens_per_s": {arm: round(mean, 1) for arm, mean in means.items()},
            "tokens_per_s_ratio": round(speed, 3),
            "best_runs_ratio": round(dropout["tokens_per_s"] / none["tokens_per_s"], 3),
            "pair_ratios": pair_ratios, "peak_memory_change": round(memory, 4),
            "live_peak_mb": live, "live_peak_memory_change": round(live_change, 4),
            "flops_per_token": flops, "model_tflops": round(model_tflops, 4), "matmul_tflops": round(peak, 4),
            "model_flops_vs_matmul": round(model_tflops / peak, 3),
            "ok": speed >= STEP_BAR and abs(live_change) <= MEMORY_BAR}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("dropout_cost", __doc__, model=False)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), metavar="NAME",
                        help=f"LoRA inputs to time, of: {', '.join(SHAPES)}")
    parser.add_argument("--p", type=float, default=0.05, help="dropout probability of the layer part")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the layer part (best of)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of the layer part")
    parser.add_argument("--parts", nargs="+", choices=["layer", "step"], default=["layer", "step"])
    parser.add_argument("--step-repeats", type=int, default=4, help="launched runs per arm")
    parser.add_argument("--data", type=Path, default=Path(TRAIN_DATA),
                        help="the step part's echo-data, or a folder preprocessed for the demo config")
    parser.add_argument("--steps", type=int, default=8, help="training steps per launched run")
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the launched runs")
    parser.add_argument("--memory-steps", type=int, default=4, help="training steps of each live-memory run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"name": "dropout_cost", "bars": {"layer_vs_nn_dropout_at_most": LAYER_BAR,
                                               "step_tokens_per_s_ratio_at_least": STEP_BAR,
                                               "step_live_peak_memory_change_at_most": MEMORY_BAR}}
    summary = ["keyed LoRA dropout"]
    if "layer" in args.parts:
        layers = {}
        for name in args.shapes:
            layers[name] = layer_costs(*SHAPES[name], args.p, args.repeats)
            print(name, layers[name], flush=True)
        result["layer"] = {"p": args.p, "threads": args.threads, "repeats": args.repeats, "shapes": layers,
                           "ok": all(row["ok"] for row in layers.values())}
        worst = max(row["keyed_vs_nn_dropout"] for row in layers.values())
        summary.append(f"layer forward+backward at most {worst:.2f}x nn.Dropout")
    if "step" in args.parts:
        step = result["step"] = step_costs(args)
        pairs = ", ".join(f"{ratio:.2f}x" for ratio in step["pair_ratios"])
        summary.append(f"demo step on {args.nproc} ranks {step['tokens_per_s_ratio']:.2f}x the mean tokens/s "
                       f"without dropout (runs in pairs: {pairs}; best runs {step['best_runs_ratio']:.2f}x), live "
                       f"peak memory {step['live_peak_memory_change']:+.1%} (resident set with "
                       f"glibc's default retention {step['peak_memory_change']:+.1%}), model FLOP/s "
                       f"{step['model_flops_vs_matmul']:.1%} of the measured matmul")
    result["ok"] = all(result[part]["ok"] for part in args.parts)
    result["summary"] = ": ".join([summary[0], "; ".join(summary[1:])]) + ("" if result["ok"] else " (a bar is missed)")
    write_result(result, args.out)
    return 0
