"""Train the reference model on generated SCBench-style conversations.

    python -m flexinference.reference_model.train --reproduce --out /tmp/ref/model.safetensors   # the shipped weights: 7 stages
    python -m flexinference.reference_model.train                      # stage 1 only (the defaults)
    python -m flexinference.reference_model.train --steps 50 --device cpu --out /tmp/ref.safetensors

One run has two phases. Phase 1 (``copy_steps`` batches): only the auxiliary copy task with strings of at
most ``copy_max`` characters, so induction (copy) heads form first: without it the 6-layer model trained
for 10k+ steps on the mix never learnt to copy from its context (H100 runs recorded in docs/accuracy.md).
Phase 2: the mix. Later training stages start from a previous run's weights (``--init``; the shipped
weights are seven such stages, recorded in ``training.json`` and re-run by ``--reproduce``).

Seeded and deterministic in its data: batch ``i`` is drawn from ``random.Random(f"train:{seed}:{i}")``
whatever the number of loader workers. In stage 2 each batch holds conversations with one context budget, drawn
uniformly from ``[min_context, top]`` where ``top`` ramps up from ``min_context + 256`` to ``max_context``
over ``ramp_steps`` batches (short contexts first: retrieval is learnt faster there), and as
many conversations as fit ``tokens_per_batch``. The stream does not depend on the run's length, so
``--minutes M`` (fit the run to a wall clock: the step count is fixed after ``calibrate`` steps and
written to ``training.json`` with the command that reproduces it) and ``--steps N`` see the same data.

Loss: next-token cross-entropy on answer tokens (weight 1) plus ``lm_weight`` times the cross-entropy on
every token (it teaches the context's structure, e.g. repeated filler lines, which builds copy heads).
Every ``eval_every`` steps, held-out conversations of each task at ``max_context`` report the
teacher-forced exact-answer rate (every token of an answer is the argmax given the golden prefix; this
equals greedy decoding reproducing the answer exactly). AdamW, linear warm-up, cosine decay to 10%,
bf16 autocast on GPU.
"""

from __future__ import annotations

import argparse
import itertools
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flexinference.reference_model.data import COPY_TASK, DEFAULT_MIX, TaskMix, make_batch
from flexinference.reference_model.model import META_FILE, TRAIN_CONTEXT, WEIGHTS_FILE, build_model, save
from flexinference.reference_model.tokenizer import CharTokenizer

__all__ = ["TrainConfig", "answer_exact_rate", "main", "recorded_stages", "reproduce", "train"]

log = logging.getLogger(__name__)

#: Every generated task fits 5 turns in a context of this many characters.
MIN_CONTEXT = 640


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (the defaults produce the shipped weights)."""

    steps: int = 12000
    minutes: float = 0.0  # > 0: fit the run to this wall clock (calibrated once the contexts stop growing)
    calibrate: int = 300
    min_context: int = 640
    max_context: int = TRAIN_CONTEXT
    ramp_steps: int = 3000
    copy_steps: int = 1000
    copy_max: int = 160
    tokens_per_batch: int = 32768
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 300
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    lm_weight: float = 0.2
    seed: int = 0
    eval_every: int = 1000
    eval_examples: int = 16
    save_every: int = 2000
    workers: int = 4
    mix: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_MIX))

    def __post_init__(self) -> None:
        for name in ("steps", "min_context", "max_context", "tokens_per_batch", "eval_every", "eval_examples",
                     "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_context < MIN_CONTEXT:
            raise ValueError(f"min_context must be >= {MIN_CONTEXT} (the smallest 5-turn context of every task)")
        if self.max_context < self.min_context:
            raise ValueError(f"max_context ({self.max_context}) must be >= min_context ({self.min_context})")
        if self.ramp_steps < 0 or self.copy_steps < 0 or self.calibrate < 1 or self.minutes < 0:
            raise ValueError("ramp_steps and copy_steps must be >= 0, calibrate >= 1 and minutes >= 0")
        if self.copy_max < 16:
            raise ValueError(f"copy_max must be >= 16, got {self.copy_max}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        TaskMix(self.mix)

    def context_budget(self, step: int, rng: random.Random) -> int:
        """The context budget of batch ``step >= copy_steps`` (the curriculum)."""
        step -= self.copy_steps
        progress = 1.0 if self.ramp_steps == 0 else min(1.0, max(0, step) / self.ramp_steps)
        top = min(self.max_context, self.min_context + 256 + int(progress * (self.max_context - self.min_context)))
        return rng.randint(self.min_context, max(self.min_context, top))

    def lr_at(self, step: int, steps: int | None = None) -> float:
        """Learning rate of ``step`` in a run of ``steps`` (default ``self.steps``)."""
        steps = self.steps if steps is None else steps
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


class _Batches(torch.utils.data.IterableDataset):
    """Batch ``i`` for ``i = 0, 1, ...`` (endless; independent of the run's length), split round-robin
    over loader workers."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        first, stride = (0, 1) if info is None else (info.id, info.num_workers)
        tok, mix = CharTokenizer(), TaskMix(self.cfg.mix)
        copy_only = TaskMix({COPY_TASK: 1.0})
        for i in itertools.count(first, stride):
            rng = random.Random(f"train:{self.cfg.seed}:{i}")
            if i < self.cfg.copy_steps:  # stage 1: short copies only, so induction heads form first
                budget = 2 * self.cfg.copy_max
                yield make_batch(rng, tok, copy_only, budget, max(1, self.cfg.tokens_per_batch // budget))
                continue
            budget = self.cfg.context_budget(i, rng)
            batch_size = max(1, self.cfg.tokens_per_batch // (budget + 768))
            yield make_batch(rng, tok, mix, budget, batch_size)


def _losses(model, ids: torch.Tensor, valid: torch.Tensor, answer: torch.Tensor):
    logits = model(input_ids=ids).logits[:, :-1].float()
    target = ids[:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    is_valid, is_answer = valid[:, 1:], answer[:, 1:]
    answer_loss = (ce * is_answer).sum() / is_answer.sum().clamp(min=1)
    lm_loss = (ce * is_valid).sum() / is_valid.sum().clamp(min=1)
    return answer_loss, lm_loss, logits


def answer_exact_rate(logits: torch.Tensor, ids: torch.Tensor, answer: torch.Tensor) -> float:
    """Fraction of answers (maximal runs of answer tokens) whose every token is the argmax prediction.

    Args:
        logits: ``(B, L - 1, V)`` next-token logits of ``ids[:, :-1]``.
        ids: ``(B, L)`` token ids.
        answer: ``(B, L)`` bool answer mask.
    """
    is_answer = answer[:, 1:]
    wrong = (logits.argmax(-1) != ids[:, 1:]) & is_answer
    starts = is_answer & ~torch.cat([torch.zeros_like(is_answer[:, :1]), is_answer[:, :-1]], dim=1)
    span = torch.cumsum(starts.flatten().long(), 0).view_as(is_answer)  # 1-based span id
    n_spans = int(starts.sum())
    if n_spans == 0:
        return float("nan")
    bad = torch.zeros(n_spans + 1, dtype=torch.long, device=ids.device)
    bad.index_add_(0, span[is_answer], wrong[is_answer].long())
    return float((bad[1:] == 0).float().mean())


@torch.no_grad()
def _evaluate(model, cfg: TrainConfig, device: torch.device, autocast) -> dict[str, float]:
    tok, out = CharTokenizer(), {}
    model.eval()
    for task in cfg.mix:
        rng = random.Random(f"eval:{cfg.seed}:{task}")
        ids, valid, answer = (t.to(device) for t in make_batch(rng, tok, TaskMix({task: 1.0}), cfg.max_context,
                                                                 cfg.eval_examples))
        with autocast():
            _, _, logits = _losses(model, ids, valid, answer)
        out[task] = answer_exact_rate(logits, ids, answer)
        hit = (logits.argmax(-1) == ids[:, 1:]) & answer[:, 1:]
        out[task + ":token"] = float(hit.sum() / answer[:, 1:].sum().clamp(min=1))
    model.train()
    return out


def train(cfg: TrainConfig, out: str | Path = WEIGHTS_FILE, device: str | None = None,
          init: str | Path | None = None) -> dict:
    """Train (from scratch, or from the weights file ``init``: a second stage) and save the weights (and
    ``training.json``) to ``out``; returns the record."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.seed)
    previous = None
    if init is not None:
        from flexinference.reference_model.model import load, load_metadata

        model = load(path=init)[0]
        meta = Path(init).parent / "training.json"
        previous = load_metadata(meta) if meta.is_file() else None
    model = model.to(device)
    model.set_attn_implementation("sdpa")
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    loader = torch.utils.data.DataLoader(_Batches(cfg), batch_size=None, num_workers=cfg.workers,
                                         prefetch_factor=4 if cfg.workers else None, persistent_workers=False)
    history, start, step, steps = [], time.perf_counter(), 0, cfg.steps
    tokens = 0
    for step, (ids, valid, answer) in enumerate(loader):
        at = cfg.copy_steps + cfg.ramp_steps  # step times are stable once the contexts stop growing
        if step == max(0, at - cfg.calibrate):
            settled = time.perf_counter()
        if cfg.minutes and step == at and step > 0:
            rate = min(step, cfg.calibrate) / (time.perf_counter() - settled)
            left = 60 * cfg.minutes - (time.perf_counter() - start)
            steps = max(step + 1, min(steps, int(step + 0.95 * rate * left)))
            print(json.dumps({"calibrated_steps": steps, "steps_per_s": round(rate, 2)}), flush=True)
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step, steps)
        ids, valid, answer = ids.to(device, non_blocking=True), valid.to(device), answer.to(device)
        with autocast():
            answer_loss, lm_loss, _ = _losses(model, ids, valid, answer)
        loss = answer_loss + cfg.lm_weight * lm_loss
        answer_loss, lm_loss = answer_loss.detach(), lm_loss.detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        tokens += int(valid.sum())
        elapsed = time.perf_counter() - start
        over_time = cfg.minutes > 0 and elapsed > 60 * cfg.minutes
        last = step >= steps - 1 or over_time
        if step % cfg.eval_every == 0 or last:
            acc = _evaluate(model, cfg, device, autocast)
            row = {"step": step, "minutes": round(elapsed / 60, 2), "answer_loss": round(float(answer_loss), 4),
                   "lm_loss": round(float(lm_loss), 4), "tokens": tokens,
                   "exact": {k: round(v, 3) for k, v in acc.items()}}
            history.append(row)
            log.info("%s", json.dumps(row))
            print(json.dumps(row), flush=True)
        if last:
            break
        if step and step % cfg.save_every == 0:
            save(model, out)  # a checkpoint in case the machine is taken back
    reproduce = dataclasses.replace(cfg, steps=steps, minutes=0.0)
    defaults = TrainConfig()
    flags = [f"--{f.name.replace('_', '-')} {getattr(reproduce, f.name)}" for f in dataclasses.fields(TrainConfig)
             if f.name != "mix" and getattr(reproduce, f.name) != getattr(defaults, f.name)]
    if cfg.mix != defaults.mix:
        flags.append(f"--mix '{json.dumps(cfg.mix, separators=(',', ':'))}'")
    record = {
        "command": " ".join(["python -m flexinference.reference_model.train", *flags]),
        "config": dataclasses.asdict(reproduce),
        "steps_done": step + 1,
        "stopped_at_time_limit": step + 1 < steps,
        "minutes": round((time.perf_counter() - start) / 60, 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "history": history,
    }
    if init is not None:
        record["command"] += " --init <weights of the previous stage>"
        record["previous_stage"] = previous
    save(model, out, record)
    return record


def recorded_stages(record: dict) -> list[TrainConfig]:
    """The training stages of a ``training.json`` record, oldest first (each later stage started from the
    weights the one before it wrote)."""
    chain = []
    while record:
        chain.append(TrainConfig(**record["config"]))
        record = record.get("previous_stage")
    return chain[::-1]


def reproduce(meta: str | Path, out: str | Path = WEIGHTS_FILE, device: str | None = None) -> dict:
    """Re-run every stage recorded in the training record ``meta``, in order, each from the weights the
    previous one wrote to ``out``; returns the last record. Data and initialisation are seeded, so on one
    device and software stack the weights come out the same (on CPU, bit for bit: tested)."""
    from flexinference.reference_model.model import load_metadata

    record = None
    for i, cfg in enumerate(recorded_stages(load_metadata(meta))):
        record = train(cfg, out, device, init=out if i else None)
    return record


def main(argv=None) -> int:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, f in fields.items():
        if name == "mix":
            continue
        p.add_argument(f"--{name.replace('_', '-')}", type=type(f.default), default=f.default)
    p.add_argument("--mix", default=None, help='JSON task weights, e.g. \'{"scbench_kv": 1}\'')
    p.add_argument("--out", default=str(WEIGHTS_FILE), help="weights file (training.json goes beside it)")
    p.add_argument("--device", default=None)
    p.add_argument("--init", default=None, help="start from this weights file (a second training stage)")
    p.add_argument("--reproduce", nargs="?", const=str(META_FILE), default=None, metavar="TRAINING_JSON",
                   help="re-run every stage recorded in this training.json (default: the shipped one's seven "
                   "stages), ignoring the other training options")
    args = p.parse_args(argv)
    if args.reproduce:
        if Path(args.out).resolve() == Path(WEIGHTS_FILE).resolve():
            p.error("--reproduce needs --out (it would overwrite the shipped weights and their training record)")
        record = reproduce(args.reproduce, args.out, args.device)
        print(json.dumps({k: record[k] for k in ("steps_done", "minutes", "device")}))
        return 0
    kwargs = {name: getattr(args, name) for name in fields if name != "mix"}
    if args.mix:
        kwargs["mix"] = json.loads(args.mix)
    record = train(TrainConfig(**kwargs), args.out, args.device, args.init)
    print(json.dumps({k: record[k] for k in ("steps_done", "minutes", "device")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
