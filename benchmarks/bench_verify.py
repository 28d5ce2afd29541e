"""What does self-verification read? The model's P(yes) to "Does this image align with the prompt: …?".

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_verify.py [--model M] [--k 8] [--guidance 3] [--steps 25]

The selector behind best-of-k (`answer_conf`) ranks a prompt's samples by the model's own yes/no answer. This
script asks what that answer depends on, with one number per (image, claim): P(yes) = the probability mass of the
yes tokens against yes + no at the first answer position (teacher-forced, as `srae scale` scores answers).

1. **Real renders** (the benchmark's held-out images, encoder tokens): the true claim "a red circle on the left",
   the same with another shape, and with another colour. If the verifier reads images, the true claim wins. A
   control through the same path: P(the true colour) among the four for "What colour is the shape?".
2. **The model's own samples** (the 36 benchmark prompts x k seeds, the shapes reader's reading of each):
   P(yes | the head's latent, its own prompt) for the samples that show their prompt's colour and shape (right)
   against those that do not (wrong) — the AUC is the chance that a right sample outranks a wrong one, which is
   what best-of-k needs — and the same with the latent re-encoded from the decoded image (`verify_on=image`).
3. **Prompt or picture?** For each wrong sample: P(yes) for its own prompt against P(yes) for the claim of what it
   does show (the reader's colour and shape, the prompt's position). A verifier that reads the picture prefers
   the drawn claim; one that echoes its prompt prefers the asked one.
4. **The questions it can answer.** P(asked colour) x P(asked shape) from the understanding questions ("What colour
   is the shape?", "What shape is in the image?"; the answer's first token among the world's values), on the
   head's latent and on the re-encoded decoded image, and the best of k each ranking picks.

Prints one table; `--json OUT` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def auc(pos: list[float], neg: list[float]) -> float | None:
    """P(a random positive scores above a random negative), ties counted half; None when a side is empty."""
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the bundled shapes model)")
    ap.add_argument("--profile", default="tiny-cpu")
    ap.add_argument("--k", type=int, default=8, help="samples per prompt")
    ap.add_argument("--prompts", type=int, default=36)
    ap.add_argument("--images", type=int, default=24, help="held-out renders")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    from scale_rae_core.config import load_profile
    from scale_rae_core.infer.generate import decode_to_image_start
    from scale_rae_core.infer.loading import bundled_model
    from scale_rae_core.infer.pipeline import SamplerSettings, Session
    from scale_rae_core.infer.understand import _request
    from scale_rae_core.models.llm import build_sample
    from scale_rae_core.prompts import GENERATION_REQUEST, SHAPES_QUESTIONS, SHAPES_WHERE, VERIFY_QUESTION
    from scale_rae_core.scale.run import _logits
    from scale_rae_core.scale.verify import yes_no_ids
    from scale_rae_core.shapes.bench import bench_prompts, heldout_specs
    from scale_rae_core.shapes.scorer import parse_prompt, read_image
    from scale_rae_core.shapes.synth import COLOURS, SHAPES, render

    start = time.perf_counter()
    profile = load_profile(args.profile)
    with Session.open(args.model or str(bundled_model()), profile) as session:
        tok = session.tokenizer
        yes, no = (sorted(ids) for ids in yes_no_ids(tok))
        N = session.model.lm.cfg.num_image_tokens
        max_len = int(session.model.lm.llm.config.max_position_embeddings)

        def p_yes(features: torch.Tensor, claim: str) -> float:
            asked = build_sample(_request(VERIFY_QUESTION.format(prompt=claim), 1), tok, N, max_len,
                                 add_generation_prompt=True)
            last = _logits(session, asked.input_ids, asked.image_starts[0], features)[-1]
            both = torch.logsumexp(last[yes + no], 0)
            return float(torch.exp(torch.logsumexp(last[yes], 0) - both))

        def claim(colour: str, shape: str, position: str) -> str:
            return f"a {colour} {shape} {SHAPES_WHERE[position]}"

        def encode(img) -> torch.Tensor:
            return session.encode_image(session.encoder_pixels([img]))[0].cpu()

        def first_ids(words) -> list[list[int]]:
            return [[tok(w, add_special_tokens=False)["input_ids"][0], tok(" " + w, add_special_tokens=False)["input_ids"][0]]
                    for w in words]

        options = {"colour": list(COLOURS), "shape": list(SHAPES)}
        option_ids = {k: first_ids(v) for k, v in options.items()}
        question = {attribute: q for q, attribute in SHAPES_QUESTIONS}

        def p_answer(features: torch.Tensor, attribute: str, value: str) -> float:
            """P(the answer to the attribute's question starts with `value`) among the attribute's values."""
            asked = build_sample(_request(question[attribute], 1), tok, N, max_len, add_generation_prompt=True)
            last = _logits(session, asked.input_ids, asked.image_starts[0], features)[-1]
            probs = torch.softmax(torch.stack([torch.logsumexp(last[ids], 0) for ids in option_ids[attribute]]), 0)
            return float(probs[options[attribute].index(value)])

        def p_colour(features: torch.Tensor, colour: str) -> float:
            return p_answer(features, "colour", colour)

        # 1. real renders
        real = {"true": [], "other shape": [], "other colour": [], "colour question": []}
        for spec in heldout_specs(args.images, args.seed):
            feats = encode(render(spec, session.encoder().input_size))
            real["colour question"].append(p_colour(feats, spec.colour))
            other_shape = SHAPES[(SHAPES.index(spec.shape) + 1) % len(SHAPES)]
            other_colour = list(COLOURS)[(list(COLOURS).index(spec.colour) + 1) % len(COLOURS)]
            real["true"].append(p_yes(feats, claim(spec.colour, spec.shape, spec.position)))
            real["other shape"].append(p_yes(feats, claim(spec.colour, other_shape, spec.position)))
            real["other colour"].append(p_yes(feats, claim(other_colour, spec.shape, spec.position)))

        # 2 + 3. the model's own samples
        sampler = SamplerSettings(steps=args.steps, guidance=args.guidance)
        rows = []
        for prompt in bench_prompts(args.prompts):
            asked = parse_prompt(prompt)
            request = GENERATION_REQUEST.format(prompt=prompt)
            _, conditions = decode_to_image_start(session, [request], 8)
            seeds = [args.seed + k for k in range(args.k)]
            tokens = session.sample(conditions.expand(len(seeds), -1, -1), seeds, sampler)
            pixels = session.decode_pixels(tokens)
            for j in range(len(seeds)):
                arr = (pixels[j].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
                img = Image.fromarray(arr)
                seen = read_image(img)
                right = seen.colour == asked["colour"] and seen.shape == asked["shape"]
                row = {"prompt": prompt, "seed": seeds[j], "right": right, "read": [seen.colour, seen.shape],
                       "latent": p_yes(tokens[j], prompt), "image": p_yes(encode(img), prompt),
                       "qa": p_answer(tokens[j], "colour", asked["colour"]) * p_answer(tokens[j], "shape", asked["shape"])}
                seen_feats = encode(img)
                row["qa_image"] = p_answer(seen_feats, "colour", asked["colour"]) * p_answer(seen_feats, "shape", asked["shape"])
                if not right and seen.colour and seen.shape:
                    row["latent_drawn"] = p_yes(tokens[j], claim(seen.colour, seen.shape, asked["position"]))
                rows.append(row)

    right = [r for r in rows if r["right"]]
    wrong = [r for r in rows if not r["right"]]
    drawn = [r for r in wrong if "latent_drawn" in r]

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    def fmt(x: float | None) -> str:
        return "–" if x is None else f"{x:.3f}"

    print(f"# {args.model or 'bundled model'}: {args.prompts} prompts x {args.k} samples (guidance {args.guidance}, "
          f"{args.steps} steps), {args.images} held-out renders; {time.perf_counter() - start:.0f} s")
    print(f"{'what':<58} {'n':>5} {'mean P(yes)':>11} {'AUC':>6}")
    print(f"{'real renders, colour question: P(true colour) of 4':<58} {len(real['colour question']):>5} "
          f"{mean(real['colour question']):>11.3f} {'':>6}")
    t = real["true"]
    for name in ("true", "other shape", "other colour"):
        a = None if name == "true" else auc(t, real[name])
        print(f"{'real renders, ' + name + ' claim':<58} {len(real[name]):>5} {mean(real[name]):>11.3f} {fmt(a):>6}")
    for on in ("latent", "image"):
        a = auc([r[on] for r in right], [r[on] for r in wrong])
        print(f"{'samples on the ' + on + ', own prompt: right':<58} {len(right):>5} {mean([r[on] for r in right]):>11.3f} {fmt(a):>6}")
        print(f"{'samples on the ' + on + ', own prompt: wrong':<58} {len(wrong):>5} {mean([r[on] for r in wrong]):>11.3f} {'':>6}")
    for key, on in (("qa", "latent"), ("qa_image", "image")):
        a = auc([r[key] for r in right], [r[key] for r in wrong])
        print(f"{'samples on the ' + on + ', P(asked colour) x P(asked shape): right':<58} {len(right):>5} "
              f"{mean([r[key] for r in right]):>11.3f} {fmt(a):>6}")
        print(f"{'samples on the ' + on + ', P(asked colour) x P(asked shape): wrong':<58} {len(wrong):>5} "
              f"{mean([r[key] for r in wrong]):>11.3f} {'':>6}")
    prefers = sum(r["latent_drawn"] > r["latent"] for r in drawn)
    print(f"{'wrong samples (latent): the asked claim':<58} {len(drawn):>5} {mean([r['latent'] for r in drawn]):>11.3f} {'':>6}")
    print(f"{'wrong samples (latent): the drawn claim':<58} {len(drawn):>5} {mean([r['latent_drawn'] for r in drawn]):>11.3f} "
          f"{fmt(auc([r['latent_drawn'] for r in drawn], [r['latent'] for r in drawn])):>6}")
    print(f"# wrong samples whose drawn claim gets the higher P(yes): {prefers} of {len(drawn)}")
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], []).append(r)
    groups = list(by_prompt.values())
    first = mean([float(g[0]["right"]) for g in groups])
    each = mean([float(r["right"]) for r in rows])
    yes_pick = mean([float(max(g, key=lambda r: r["latent"])["right"]) for g in groups])
    qa_pick = mean([float(max(g, key=lambda r: r["qa"])["right"]) for g in groups])
    qa_image_pick = mean([float(max(g, key=lambda r: r["qa_image"])["right"]) for g in groups])
    print(f"# colour+shape: first sample {first:.3f}, mean over k {each:.3f}, best of k by P(yes) {yes_pick:.3f}, "
          f"by P(asked colour) x P(asked shape) on the latent {qa_pick:.3f}, on the image {qa_image_pick:.3f}, oracle {mean([float(any(r['right'] for r in g)) for g in groups]):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "real": real, "samples": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
