"""infinipot-policies: the compression policies side by side on one video, with what each one keeps.

Every policy streams the same video (same model, loaded once; same frames,
notes and questions, :class:`~.stream.VideoSession`) from an empty cache.
Per policy it reports:

* ``overlap``: kept-token overlap with the reference policy (the first of
  ``--policies``, default infinipot_v) at the end of the stream: per layer and
  KV head |A ∩ B| / |A ∪ B| of the cached vision token ids (Jaccard), averaged
  over layers and heads; 1.0 for the reference itself;
* ``kv_bytes_peak`` (K and V of all layers, the session's peak: chunks before
  their compression and answers included), ``compressions``,
  ``compression_ms`` (mean wall time of one compression, all layers);
* ``note_tokens``: note tokens still held by layer 0 / KV head 0;
* per question the answer and, with ``--expect TEXT``, whether it contains TEXT
  (case-insensitive): the recall of a fact given as ``--note-at`` early in the stream.

Exit codes: 0 ok, 2 bad arguments or unreadable video/model.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from .stream import AnswerRecord, FrameRecord, TimedQuestion, VideoSession, parse_ask_at, parse_note_at

#: Policies compared by default (the paper's method first: it is the reference).
DEFAULT_POLICIES = ("infinipot_v", "tar", "van", "van_pool", "uniform", "recent")


@dataclass
class PolicyRow:
    """One policy's figures (the JSON line / table row)."""

    policy: str
    overlap: float  # Jaccard of kept vision token ids with the reference policy, mean over layers and heads
    kv_bytes_peak: int
    compressions: int
    compression_ms: float  # mean per compression (ms)
    vision_tokens: int  # vision + note tokens per layer and head at the end
    note_tokens: int
    frames_ingested: int
    answers: list = field(default_factory=list)  # [{"question", "answer", "recalled"?}]

    def to_json(self) -> dict:
        return asdict(self)


def kept_token_ids(engine) -> list:
    """Per layer, the [B, H_kv, V] ids of the cached vision (and note) tokens, as CPU sets per (b, h)."""
    cache = engine.cache
    out = []
    for layer in range(cache.num_layers):
        ids = cache.vision_token_ids(layer).cpu()
        out.append([[set(ids[b, h].tolist()) for h in range(ids.shape[1])] for b in range(ids.shape[0])])
    return out


def overlap(a: list, b: list) -> float:
    """Mean over layers, batch and heads of |A ∩ B| / |A ∪ B| (1.0 when both are empty)."""
    scores = []
    for la, lb in zip(a, b):
        for ba, bb in zip(la, lb):
            for ha, hb in zip(ba, bb):
                union = ha | hb
                scores.append(len(ha & hb) / len(union) if union else 1.0)
    return sum(scores) / max(1, len(scores))


def run_policy(adapter, config, path: str, questions: Sequence[TimedQuestion], notes, *, max_frames: int = 0,
               expect: str = "") -> tuple[PolicyRow, list]:
    """Stream ``path`` through a fresh engine of ``config`` (sharing ``adapter``); (row without overlap, kept ids)."""
    from ..engine import StreamingAssistant

    engine = StreamingAssistant(config, adapter=adapter)
    session = VideoSession(engine, path, questions, max_frames=max_frames, notes=notes)
    comp_ms = []
    answers = []
    for rec in session.events():
        if isinstance(rec, FrameRecord) and rec.compressed:
            comp_ms.append(engine.cache.last_compression.ms)
        elif isinstance(rec, AnswerRecord):
            entry = {"question": rec.question, "answer": rec.answer or rec.error}
            if expect:
                entry["recalled"] = expect.lower() in rec.answer.lower()
            answers.append(entry)
    st = engine.stats()
    row = PolicyRow(
        policy=config.policy, overlap=0.0, kv_bytes_peak=session.kv_bytes_peak, compressions=st.cache.compressions,
        compression_ms=round(sum(comp_ms) / len(comp_ms), 3) if comp_ms else 0.0,
        vision_tokens=st.cache.vision_tokens, note_tokens=st.notes.tokens_in_cache,
        frames_ingested=st.frames.ingested, answers=answers,
    )
    return row, kept_token_ids(engine)


def compare(adapter, base_config, path: str, policies: Sequence[str], *, questions=(), notes=(), max_frames: int = 0,
            expect: str = "") -> list[PolicyRow]:
    """Every policy of ``policies`` on ``path``; overlaps against the first one."""
    import dataclasses

    rows, ref = [], None
    for name in policies:
        cfg = dataclasses.replace(base_config, policy=name)
        row, kept = run_policy(adapter, cfg, path, questions, notes, max_frames=max_frames, expect=expect)
        if ref is None:
            ref = kept
        row.overlap = round(overlap(kept, ref), 4)
        rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    from ..engine import EngineConfig

    d = EngineConfig()
    p = argparse.ArgumentParser(prog="infinipot-policies", description=__doc__.split("\n")[0])
    p.add_argument("--video", required=True)
    p.add_argument("--model", default=d.model, help="builtin name, local dir or HF id (default %(default)s)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                   help="comma-separated; the first is the overlap reference (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=512, help="M, vision tokens per layer and head (default %(default)s)")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels)
    p.add_argument("--fps", type=float, default=d.frame_rate_hz)
    p.add_argument("--max-frames", type=int, default=0)
    p.add_argument("--note-at", action="append", default=[], metavar="SECONDS:TEXT")
    p.add_argument("--ask", action="append", default=[], metavar="QUESTION", help="asked after the last frame")
    p.add_argument("--ask-at", action="append", default=[], metavar="SECONDS:QUESTION")
    p.add_argument("--expect", default="", help="text an answer must contain to count as recalled")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", action="store_true", help="one JSON object per policy")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ..engine import EngineConfig
    from ..models import load_adapter

    try:
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        questions = [parse_ask_at(t) for t in args.ask_at] + [TimedQuestion(q) for q in args.ask]
        notes = [parse_note_at(t) for t in args.note_at]
        base = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_vision_tokens=args.max_tokens,
                            max_pixels=args.max_pixels, frame_rate_hz=args.fps, max_new_tokens=args.max_new_tokens)
        for name in policies:
            EngineConfig(policy=name, max_vision_tokens=args.max_tokens)
        if not policies:
            raise ValueError("--policies is empty")
    except ValueError as exc:
        print(f"infinipot-policies: {exc}", file=sys.stderr)
        return 2
    try:
        adapter = load_adapter(base.model, device=base.device, dtype=base.dtype, **base.adapter_kwargs())
    except (ValueError, OSError) as exc:
        print(f"infinipot-policies: cannot load model: {exc}", file=sys.stderr)
        return 2
    try:
        rows = compare(adapter, base, args.video, policies, questions=questions, notes=notes,
                       max_frames=args.max_frames, expect=args.expect)
    except OSError as exc:
        print(f"infinipot-policies: {exc}", file=sys.stderr)
        return 2
    if args.json:
        for r in rows:
            print(json.dumps(r.to_json()))
        return 0
    print(f"{'policy':<12} {'overlap':>8} {'peak KV MB':>11} {'compr.':>7} {'ms/compr.':>10} {'note tok':>9}  answers")
    for r in rows:
        said = "; ".join((("+" if a.get("recalled") else "-") if "recalled" in a else "") + repr(a["answer"][:40])
                         for a in r.answers)
        print(f"{r.policy:<12} {r.overlap:>8.3f} {r.kv_bytes_peak / 1e6:>11.3f} {r.compressions:>7} "
              f"{r.compression_ms:>10.2f} {r.note_tokens:>9}  {said}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
