"""A study (issue 23): what makes DMVAE's latents easier to generate from, arm by arm over full-chain seeds.

`configs/study/study.yaml` names the arms, the seeds, the data and the stage configs; this module expands it into two
ordinary pipelines under one store, so a study resumes like any pipeline and shares the steps its arms have in common:

1. **select** (on the validation split, never the test split): the shards (`train-fit`), the evaluator classifier,
   the DMVAE chain of the first seed (its measured FLOPs size the equal-compute arm), and one KL-VAE chain per
   candidate KL weight (first seed) scored by gFID against the `val` images. The choices (the KL weight with the
   lowest validation gFID; the KL tokenizer's images that give the KL chain the DMVAE chain's tokenizer compute) go to
   `<store>/study/choices.json`, with what they were computed from; a rerun reads them back.
2. **main**: every arm for every seed, teacher through generator, the same generator config and sampler everywhere,
   gFID/KID/classifier accuracy against the test split (tags: arm as `latent_space`, seed), rFID/PSNR of each
   tokenizer, and the report: per arm mean and range over seeds, and the paired differences of DMVAE against every
   other arm with intervals and verdicts (eval/paired.py).

Arms (a chain seed s sets `seed=s` in every train step of the chain and of its generator):
    dmvae             teacher_s -> tok_s (on the teacher) -> ref_s -> dmd_s -> dec_s
    no_dm             dmd.yaml with dm.lambda_dm=0 on tok_s and ref_s (the same stages, the same images) -> dec
    random_teacher    tokenizer on a randomly initialised teacher of the same architecture (random_vit, seeded)
    kl                the KL-VAE at the chosen KL weight
    kl_equal_compute  the same KL-VAE given the DMVAE chain's tokenizer-side FLOPs (teacher, tokenizer, reference,
                      dmd and decoder stages, as their runs counted them) by a longer KL tokenizer stage
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import read_yaml
from ..data import storage
from .spec import PIPELINE_FILE, PipelineError

STUDY_FILE = "study.yaml"
ARMS = ("dmvae", "no_dm", "random_teacher", "kl", "kl_equal_compute")
# the stage configs an arm's chain reads, from the study's `stages` directory
STAGE_FILES = ("teacher.yaml", "tokenizer.yaml", "reference.yaml", "dmd.yaml", "decoder.yaml", "kl_tokenizer.yaml",
               "kl_decoder.yaml", "generator.yaml")
CHOICES = "study/choices.json"


@dataclass
class Study:
    config_dir: Path
    title: str
    stages: Path
    seeds: list[int]
    arms: list[str]
    kl_weights: list[float]
    data: dict[str, Any]
    validation: dict[str, Any]
    test: dict[str, Any]
    samples: dict[str, Any]
    classifier: dict[str, Any]
    tokenizer_eval: dict[str, Any] = field(default_factory=dict)
    probe_limit: int = 10_000
    max_concurrent: int = 1  # steps at once in each phase's pipeline (the arms side by side on a cluster)
    # generator checkpoints (images seen) that the first seed's dmvae and kl generators are also scored at, on test:
    # the gFID-over-training curve and the stretch target (dmvae at half the images against kl's final gFID)
    curve_images: list[int] = field(default_factory=list)
    launcher: str = "auto"  # where each phase's steps run (pipeline.yaml's `launcher:`): ray, local or auto


def _need(cond: bool, where: Path, text: str) -> None:
    if not cond:
        raise PipelineError(f"{where}: {text}")


def load_study(config_dir: str | Path) -> Study:
    config_dir = Path(config_dir)
    path = config_dir / STUDY_FILE
    _need(path.is_file(), path, f"not found; a study directory holds {STUDY_FILE} (see configs/study/{STUDY_FILE})")
    doc = read_yaml(path)
    known = {"title", "stages", "seeds", "arms", "kl_weights", "data", "validation", "test", "samples", "classifier",
             "tokenizer_eval", "probe_limit", "max_concurrent", "curve_images", "launcher"}
    unknown = sorted(set(doc) - known)
    _need(not unknown, path, f"unknown key(s) {unknown}; a study takes {sorted(known)}")
    stages = (config_dir / str(doc.get("stages", "."))).resolve()
    missing = [f for f in STAGE_FILES if not (stages / f).is_file()]
    _need(not missing, path, f"stages: {stages} lacks {', '.join(missing)}; name a directory with the stage "
                             f"configs (e.g. stages: ../demo)")
    seeds = doc.get("seeds", [0, 1, 2])
    _need(isinstance(seeds, list) and len(seeds) >= 1 and all(isinstance(s, int) for s in seeds)
          and len(set(seeds)) == len(seeds), path, f"seeds: a list of distinct integers, got {seeds!r}")
    arms = doc.get("arms", list(ARMS))
    bad = [a for a in arms if a not in ARMS]
    _need(isinstance(arms, list) and "dmvae" in arms and not bad, path,
          f"arms: a list that holds dmvae, from {', '.join(ARMS)}; got {arms!r}")
    weights = doc.get("kl_weights", [1e-6, 1e-4, 1e-2])
    _need(isinstance(weights, list) and all(isinstance(w, (int, float)) and w > 0 for w in weights) and weights,
          path, f"kl_weights: a non-empty list of positive numbers (per-element KL weights), got {weights!r}")
    data = dict(doc.get("data", {"source": "fashion-mnist", "split": "train-fit", "limit": 10_000}))
    validation = dict(doc.get("validation", {"split": "val", "limit": 2000}))
    test = dict(doc.get("test", {"split": "test", "limit": 10_000}))
    _need(validation.get("split") != test.get("split"), path,
          f"validation.split and test.split are both {test.get('split')!r}: choices would be made on the test split")
    _need(data.get("split") != validation.get("split"), path,
          f"data.split and validation.split are both {data.get('split')!r}: the choices would be scored on "
          f"training images (Fashion-MNIST: train on train-fit, choose on val)")
    at_once = doc.get("max_concurrent", 1)
    _need(isinstance(at_once, int) and not isinstance(at_once, bool) and at_once >= 1, path,
          f"max_concurrent: a positive whole number of steps at once, got {at_once!r}")
    from ..train.launch import LAUNCHERS
    launcher = doc.get("launcher", "auto")
    _need(launcher in LAUNCHERS, path, f"launcher: one of {', '.join(LAUNCHERS)} (where each step runs), got "
                                      f"{launcher!r}")
    curve = doc.get("curve_images", [])
    _need(isinstance(curve, list) and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in curve)
          and len(set(curve)) == len(curve), path,
          f"curve_images: a list of distinct positive image counts (generator checkpoints, e.g. [51200]), "
          f"got {curve!r}")
    return Study(config_dir, str(doc.get("title", "DMVAE study")), stages, seeds, arms, [float(w) for w in weights],
                 data, validation, test, dict(doc.get("samples", {"per_class": 200, "batch_size": 250})),
                 dict(doc.get("classifier", {"limit": 10_000, "test_limit": 2000, "epochs": 3})),
                 dict(doc.get("tokenizer_eval", {"limit": 1000})), int(doc.get("probe_limit", 10_000)), at_once,
                 sorted(curve), str(launcher))


# ----------------------------------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------------------------------

def _train(name: str, config: str, **fields) -> dict:
    overrides = fields.pop("overrides", [])
    return {"name": name, "kind": "train", "config": config, **fields, "overrides": list(overrides)}


def _dmvae_chain(s: int, with_teacher: bool = True) -> list[dict]:
    seed = [f"seed={s}"]
    out = [_train(f"teacher_s{s}", "teacher.yaml", data="shards", overrides=seed)] if with_teacher else []
    out += [_train(f"tok_s{s}", "tokenizer.yaml", data="shards", teacher=f"teacher_s{s}", overrides=seed),
            _train(f"ref_s{s}", "reference.yaml", data="shards", tokenizer=f"tok_s{s}", overrides=seed),
            _train(f"dmd_s{s}", "dmd.yaml", data="shards", tokenizer=f"tok_s{s}", real_score=f"ref_s{s}",
                   overrides=seed),
            _train(f"dec_s{s}", "decoder.yaml", data="shards", tokenizer=f"dmd_s{s}", overrides=seed)]
    return out


def _kl_chain(prefix: str, s: int, weight: float, images: Optional[int] = None) -> list[dict]:
    tok = [f"seed={s}", f"loss.kl_weight={weight!r}"] + ([f"total_images={images}"] if images else [])
    return [_train(f"{prefix}_tok", "kl_tokenizer.yaml", data="shards", overrides=tok),
            _train(f"{prefix}_dec", "kl_decoder.yaml", data="shards", tokenizer=f"{prefix}_tok",
                   overrides=[f"seed={s}"])]


def _real_stats(st: Study, split: dict) -> dict:
    """The FID statistics of a split's real images, computed once for every eval step against it."""
    return {"name": f"{split.get('split')}_stats", "kind": "real_stats", "source": st.data.get("source", "fashion-mnist"),
            "image_size": 32, **split}


def _score(st: Study, name: str, samples: str, split: dict, tags: dict) -> dict:
    return {"name": name, "kind": "eval", "samples": samples, "classifier": "classifier",
            "source": st.data.get("source", "fashion-mnist"), "image_size": 32, **split,
            "real_stats": f"{split.get('split')}_stats", "tags": tags}


def _generate(st: Study, prefix: str, decoder: str, s: int, split: dict, tags: dict) -> list[dict]:
    """Latents of a chain's decoder, the generator on them (seed s), its samples and their gFID against `split`."""
    return [{"name": f"{prefix}_lat", "kind": "cache_latents", "data": "shards", "tokenizer": decoder,
             "batch_size": 128, "weights": "raw"},
            _train(f"{prefix}_gen", "generator.yaml", tokenizer=decoder, latents=f"{prefix}_lat",
                   overrides=[f"seed={s}"]),
            {"name": f"{prefix}_smp", "kind": "sample", "generator": f"{prefix}_gen", **st.samples},
            _score(st, f"{prefix}_fid", f"{prefix}_smp", split, tags)]


def _common(st: Study) -> list[dict]:
    source = st.data.get("source", "fashion-mnist")
    return [{"name": "shards", "kind": "shards", **st.data},
            # the evaluator: trained on the training part, its own accuracy measured on the validation images
            {"name": "classifier", "kind": "classifier", "source": source, "split": st.data.get("split"),
             "test_split": st.validation.get("split"), **st.classifier}]


def select_steps(st: Study) -> list[dict]:
    s = st.seeds[0]
    steps = _common(st) + [_real_stats(st, st.validation)] + _dmvae_chain(s)
    for i, w in enumerate(st.kl_weights):
        p = f"klsel{i}"
        steps += _kl_chain(p, s, w)
        steps += _generate(st, p, f"{p}_dec", s, st.validation, {"latent_space": "kl_select", "kl_weight": w,
                                                                   "seed": s})
    return steps


def main_steps(st: Study, choices: dict) -> list[dict]:
    steps = select_steps(st)  # complete by now: skipped, and shared (the first seed's DMVAE chain, the KL candidates)
    steps.append(_real_stats(st, st.test))
    source = st.data.get("source", "fashion-mnist")
    for s in st.seeds:
        if s != st.seeds[0]:
            steps += _dmvae_chain(s)
        steps.append({"name": f"probe_s{s}", "kind": "probe", "teacher": f"teacher_s{s}", "limit": st.probe_limit})
        chains: dict[str, str] = {"dmvae": f"dec_s{s}"}
        if "no_dm" in st.arms:
            steps += [_train(f"nodm_s{s}", "dmd.yaml", data="shards", tokenizer=f"tok_s{s}", real_score=f"ref_s{s}",
                             overrides=[f"seed={s}", "dm.lambda_dm=0"]),
                      _train(f"nodm_dec_s{s}", "decoder.yaml", data="shards", tokenizer=f"nodm_s{s}",
                             overrides=[f"seed={s}"])]
            chains["no_dm"] = f"nodm_dec_s{s}"
        if "random_teacher" in st.arms:  # no `teacher` field: tokenizer.yaml's random_vit, seeded by the chain seed
            seed = [f"seed={s}"]
            steps += [_train(f"rtok_s{s}", "tokenizer.yaml", data="shards", overrides=seed),
                      _train(f"rref_s{s}", "reference.yaml", data="shards", tokenizer=f"rtok_s{s}", overrides=seed),
                      _train(f"rdmd_s{s}", "dmd.yaml", data="shards", tokenizer=f"rtok_s{s}", real_score=f"rref_s{s}",
                             overrides=seed),
                      _train(f"rdec_s{s}", "decoder.yaml", data="shards", tokenizer=f"rdmd_s{s}", overrides=seed)]
            chains["random_teacher"] = f"rdec_s{s}"
        reused: dict[str, str] = {}  # arm -> the samples step it shares with the select phase
        if "kl" in st.arms and s == st.seeds[0]:
            # the chosen candidate IS the first seed's KL chain (same weight, same seed, same configs): its samples,
            # scored on the validation split to choose, are scored again here on the test split
            chosen = f"klsel{st.kl_weights.index(choices['kl_weight'])}"
            chains["kl"], reused["kl"] = f"{chosen}_dec", f"{chosen}_smp"
        elif "kl" in st.arms:
            steps += _kl_chain(f"kl_s{s}", s, choices["kl_weight"])
            chains["kl"] = f"kl_s{s}_dec"
        if "kl_equal_compute" in st.arms:
            steps += _kl_chain(f"klc_s{s}", s, choices["kl_weight"], choices["kl_equal_compute_images"])
            chains["kl_equal_compute"] = f"klc_s{s}_dec"
        for arm, decoder in chains.items():
            tags = {"latent_space": arm, "seed": s}
            steps += [_score(st, f"{arm}_s{s}_fid", reused[arm], st.test, tags)] if arm in reused else \
                _generate(st, f"{arm}_s{s}", decoder, s, st.test, tags)
            steps.append({"name": f"{arm}_s{s}_rec", "kind": "eval_tokenizer", "tokenizer": decoder,
                          "source": source, "split": st.test.get("split"), "weights": "raw",
                          **st.tokenizer_eval, "tags": {"latent_space": arm, "seed": s}})
            if s == st.seeds[0] and arm in ("dmvae", "kl"):
                # the kl arm's first-seed generator is the chosen select-phase candidate's
                gen = f"{reused[arm][:-len('_smp')]}_gen" if arm in reused else f"{arm}_s{s}_gen"
                for n in st.curve_images:
                    steps += [{"name": f"{arm}_s{s}_smp_at{n}", "kind": "sample", "generator": gen, **st.samples,
                               "images": n},
                              _score(st, f"{arm}_s{s}_fid_at{n}", f"{arm}_s{s}_smp_at{n}", st.test, tags)]
    steps.append({"name": "report", "kind": "report", "title": st.title, "ours": "dmvae", "baseline": "kl"})
    return steps


def write_pipeline_dir(st: Study, steps: list[dict], out: Path) -> Path:
    """A pipeline directory (pipeline.yaml and the stage configs beside it) for `load_pipeline`."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in STAGE_FILES:
        shutil.copyfile(st.stages / name, out / name)
    header = f"# generated by `dmvae-scale study {st.config_dir}` from {STUDY_FILE}; edit that file, not this one\n"
    doc = {"launcher": st.launcher, "max_concurrent": st.max_concurrent, "steps": steps}
    (out / PIPELINE_FILE).write_text(header + yaml.safe_dump(doc, sort_keys=False, width=120))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The choices, made on the validation split
# ----------------------------------------------------------------------------------------------------------------------

def _metrics(pipe, name: str) -> dict:
    from .state import read_json
    doc = read_json(storage.join(pipe.url(name), "metrics.json"))
    if doc is None:
        raise PipelineError(f"study: step {name} has no metrics.json; run the select phase to its end")
    return doc


def run_flops(pipe, name: str) -> tuple[float, int]:
    """(counted GFLOPs per training image, images trained) of a train step, from its run's metrics.jsonl."""
    from .report import metrics_curve
    curve = [v for _, v in metrics_curve(pipe.url(name), "gflops_per_image") if v]
    per_image = curve[-1] if curve else None
    if per_image is None:
        raise PipelineError(f"study: run {pipe.url(name)} logged no gflops_per_image (its FLOP count); the "
                            f"equal-compute arm needs every DMVAE stage's count")
    return float(per_image), int(pipe.train_config(pipe.step(name)).total_images)


def make_choices(st: Study, pipe) -> dict:
    """The KL weight with the lowest validation gFID, and the KL tokenizer's images for equal tokenizer compute."""
    scored = [{"kl_weight": w, "val_fid": float(_metrics(pipe, f"klsel{i}_fid")["fid"])}
              for i, w in enumerate(st.kl_weights)]
    finite = [c for c in scored if math.isfinite(c["val_fid"])]
    if not finite:
        raise PipelineError(f"study: no KL weight has a finite validation gFID ({scored}); look at the klsel steps")
    best = min(finite, key=lambda c: c["val_fid"])
    i = st.kl_weights.index(best["kl_weight"])
    s = st.seeds[0]
    dmvae = {name: run_flops(pipe, name) for name in (f"teacher_s{s}", f"tok_s{s}", f"ref_s{s}", f"dmd_s{s}",
                                                        f"dec_s{s}")}
    dmvae_total = sum(f * n for f, n in dmvae.values())
    kl_tok, kl_dec = run_flops(pipe, f"klsel{i}_tok"), run_flops(pipe, f"klsel{i}_dec")
    batch = int(pipe.train_config(pipe.step(f"klsel{i}_tok")).batch_size)
    images = max(batch, int(round((dmvae_total - kl_dec[0] * kl_dec[1]) / kl_tok[0] / batch)) * batch)
    return {"kl_weight": best["kl_weight"], "validation": scored, "kl_equal_compute_images": images,
            "dmvae_chain_gflops": dmvae_total, "dmvae_stages": {k: {"gflops_per_image": f, "images": n}
                                                                for k, (f, n) in dmvae.items()},
            "kl_tokenizer_gflops_per_image": kl_tok[0], "kl_decoder_gflops": kl_dec[0] * kl_dec[1],
            "kl_images_at_equal_compute_vs_default": images / kl_tok[1]}


def read_choices(store: str) -> Optional[dict]:
    from .state import read_json
    return read_json(storage.join(store, CHOICES))


def write_choices(store: str, choices: dict) -> None:
    storage.write_bytes(storage.join(store, CHOICES), json.dumps(choices, indent=2).encode())


def format_choices(choices: dict) -> str:
    val = ", ".join(f"{c['kl_weight']:g}: {c['val_fid']:.2f}" for c in choices["validation"])
    return (f"study choices (validation split): KL weight {choices['kl_weight']:g} (val gFID by weight: {val}); "
            f"equal tokenizer compute: the KL tokenizer trains {choices['kl_equal_compute_images']:,} images "
            f"({choices['kl_images_at_equal_compute_vs_default']:.2f}x its default) for the DMVAE chain's "
            f"{_flops(choices['dmvae_chain_gflops'] * 1e9)}")


def _flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= scale:
            return f"{n / scale:,.3g} {unit}"
    return f"{n:,.3g} FLOP"


# ----------------------------------------------------------------------------------------------------------------------
# Running it
# ----------------------------------------------------------------------------------------------------------------------

def run_study(config_dir: str | Path, store: str, overrides: list[str] = (), *, check: bool = False,
              address: Optional[str] = None, work_dir: Optional[str] = None,
              max_concurrent: Optional[int] = None) -> list[str]:
    """The select phase, the choices, then the main phase; with check=True only the plan (returned as lines).
    max_concurrent: steps at once in each phase (default: study.yaml's); a failed step fails its phase once every
    other branch of it has ended (pipeline.run.PipelineFailed), and the same command again finishes the rest."""
    from ..log import say
    from .run import plan, run_pipeline
    from .spec import load_pipeline
    from .state import work_dir_for
    st = load_study(config_dir)
    work = Path(work_dir) if work_dir else work_dir_for(store)
    select = load_pipeline(write_pipeline_dir(st, select_steps(st), work / "study" / "select"), store, overrides)
    stored = read_choices(select.store)
    if check:
        lines = [f"study {st.title!r}: arms {', '.join(st.arms)}; seeds {st.seeds}; KL weights "
                 f"{', '.join(f'{w:g}' for w in st.kl_weights)} chosen on {st.validation.get('split')}",
                 "select phase:", *plan(select, address)]
        if stored is None:
            lines.append("main phase: planned after the select phase (its choices are not made yet)")
        else:
            main = load_pipeline(write_pipeline_dir(st, main_steps(st, stored), work / "study" / "main"), store,
                                 overrides)
            lines += [format_choices(stored), "main phase:", *plan(main, address)]
        return lines
    say("study", f"select phase: {len(select.steps)} steps (choices on the {st.validation.get('split')} split)")
    run_pipeline(select, address=address, work_dir=work_dir, max_concurrent=max_concurrent)
    choices = make_choices(st, select)
    if stored is not None and (stored["kl_weight"], stored["kl_equal_compute_images"]) != \
            (choices["kl_weight"], choices["kl_equal_compute_images"]):
        raise PipelineError(f"study: {storage.join(select.store, CHOICES)} chose KL weight {stored['kl_weight']:g} "
                            f"and {stored['kl_equal_compute_images']} images, but the select phase's outputs now give "
                            f"{choices['kl_weight']:g} and {choices['kl_equal_compute_images']}; the main phase's KL "
                            f"arms were made with the old choices: delete them and the choices file to redo them")
    write_choices(select.store, choices)
    say("study", format_choices(choices))
    main = load_pipeline(write_pipeline_dir(st, main_steps(st, choices), work / "study" / "main"), store, overrides)
    say("study", f"main phase: {len(main.steps)} steps")
    run_pipeline(main, address=address, work_dir=work_dir, max_concurrent=max_concurrent)
    return [format_choices(choices)]
