"""The study (pipeline/study.py, configs/study): its expansion into a select and a main pipeline (arms, seeds, shared
steps, the validation split for choices and the test split for the table), the choices made from what the select
phase measured, and refusals of a study.yaml that would choose on the test split."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmvae_scale.cli import main
from dmvae_scale.pipeline import PipelineError, load_pipeline
from dmvae_scale.pipeline.study import (ARMS, load_study, main_steps, make_choices, select_steps, write_choices,
                                        write_pipeline_dir)
from repo import REPO

pytestmark = pytest.mark.unit
STUDY = REPO / "configs" / "study"
CHOICES = {"kl_weight": 1e-4, "kl_equal_compute_images": 38400, "validation": [], "dmvae_chain_gflops": 1.0,
           "kl_images_at_equal_compute_vs_default": 3.0}


def _by_name(steps):
    return {s["name"]: s for s in steps}


def test_every_arm_runs_every_seed_with_the_same_generator_and_the_test_split():
    st = load_study(STUDY)
    assert st.seeds == [0, 1, 2] and st.arms == list(ARMS) and len(st.kl_weights) >= 3
    steps = _by_name(main_steps(st, CHOICES))
    for arm in ARMS:
        for s in st.seeds:
            fid = steps[f"{arm}_s{s}_fid"]
            assert fid["split"] == "test" and fid["tags"] == {"latent_space": arm, "seed": s}
            assert fid["limit"] == 10_000 and steps[fid["samples"]]["per_class"] == 200  # 2,000 samples, all of test
            gen = steps[steps[fid["samples"]]["generator"]]
            assert gen["config"] == "generator.yaml" and gen["overrides"] == [f"seed={s}"]
    # every train step of a chain carries its chain seed
    assert all(f"seed={s}" in steps[f"{p}_s{s}"]["overrides"] for s in st.seeds
               for p in ("teacher", "tok", "ref", "dmd", "dec", "nodm", "rtok", "rdmd"))


def test_arms_share_what_they_have_in_common_and_differ_where_they_should():
    st = load_study(STUDY)
    steps = _by_name(main_steps(st, CHOICES))
    for s in st.seeds:
        nodm = steps[f"nodm_s{s}"]  # lambda=0: the DMVAE chain's stage 1 and reference, the same dmd config
        assert (nodm["config"], nodm["tokenizer"], nodm["real_score"]) == ("dmd.yaml", f"tok_s{s}", f"ref_s{s}")
        assert "dm.lambda_dm=0" in nodm["overrides"] and "dm.lambda_dm=0" not in steps[f"dmd_s{s}"]["overrides"]
        assert steps[f"tok_s{s}"]["teacher"] == f"teacher_s{s}"
        assert "teacher" not in steps[f"rtok_s{s}"]  # tokenizer.yaml's random_vit, same architecture, seeded
        assert "loss.kl_weight=0.0001" in steps[f"klc_s{s}_tok"]["overrides"]
        assert "total_images=38400" in steps[f"klc_s{s}_tok"]["overrides"]
    # the first seed's KL arm is the chosen candidate itself (klsel1: 1e-4), scored again on the test split
    assert steps["kl_s0_fid"]["samples"] == "klsel1_smp" and "kl_s0_tok" not in steps
    assert steps["kl_s1_tok"]["overrides"] == ["seed=1", "loss.kl_weight=0.0001"]


def test_the_first_seeds_dmvae_and_kl_generators_are_scored_at_half_their_images_on_test(tmp_path):
    st = load_study(STUDY)
    assert st.curve_images == [51200]
    steps = _by_name(main_steps(st, CHOICES))
    curve = sorted(n for n, s in steps.items() if s["kind"] == "sample" and s.get("images") is not None)
    assert curve == ["dmvae_s0_smp_at51200", "kl_s0_smp_at51200"]  # one seed, the headline's two arms
    # the kl arm's first-seed generator is the chosen select-phase candidate's (klsel1: 1e-4)
    assert steps["kl_s0_smp_at51200"]["generator"] == "klsel1_gen"
    assert steps["dmvae_s0_smp_at51200"]["generator"] == "dmvae_s0_gen"
    for arm in ("dmvae", "kl"):
        fid = steps[f"{arm}_s0_fid_at51200"]
        assert fid["samples"] == f"{arm}_s0_smp_at51200" and fid["split"] == "test" and fid["limit"] == 10_000
        assert fid["tags"] == {"latent_space": arm, "seed": 0}
        assert steps[fid["samples"]]["per_class"] == 200
    # the checkpoint exists: generator.yaml checkpoints every 25,600 images of its 102,400
    pipe_cfg = load_pipeline(write_pipeline_dir(st, main_steps(st, CHOICES), tmp_path / "main"), str(tmp_path / "s"))
    gen = pipe_cfg.train_config(pipe_cfg.step("dmvae_s0_gen"))
    assert 51200 % gen.ckpt_every_images == 0 and 51200 * 2 == gen.total_images


def test_choices_are_made_on_the_validation_split_only():
    st = load_study(STUDY)
    select = select_steps(st)
    evals = [s for s in select if s["kind"] == "eval"]
    assert len(evals) == len(st.kl_weights) and all(e["split"] == "val" for e in evals)
    assert _by_name(select)["shards"]["split"] == "train-fit"  # disjoint from val
    assert _by_name(select)["classifier"]["test_split"] == "val"
    assert not any(s["kind"] == "eval" and s.get("split") == "test" for s in select)


def test_both_phases_load_and_validate_every_stage_config(tmp_path):
    st = load_study(STUDY)
    pipe = load_pipeline(write_pipeline_dir(st, main_steps(st, CHOICES), tmp_path / "main"), str(tmp_path / "s"))
    assert len(pipe.steps) == len(main_steps(st, CHOICES))
    cfg = pipe.train_config(pipe.step("nodm_s1"))
    assert cfg.dm.lambda_dm == 0 and cfg.seed == 1
    assert pipe.train_config(pipe.step("klc_s2_tok")).total_images == 38400
    assert pipe.train_config(pipe.step("rtok_s0")).teacher.name == "random_vit"


def test_the_phases_run_as_many_steps_at_once_and_where_the_study_says(tmp_path):
    import yaml
    doc = yaml.safe_load((STUDY / "study.yaml").read_text())
    # the 2-core default: two one-CPU Ray workers at once, as the demo
    assert doc["max_concurrent"] == 2 and doc["launcher"] == "ray"
    pipe = load_pipeline(write_pipeline_dir(load_study(STUDY), main_steps(load_study(STUDY), CHOICES),
                                            tmp_path / "default"), str(tmp_path / "s"))
    assert all(pipe.launcher_of(s, pipe.train_config(s)) == "ray" for s in pipe.steps if s.kind == "train")
    doc.update(max_concurrent=6, launcher="auto", stages=str(REPO / "configs" / "demo"))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(doc))
    st = load_study(tmp_path)
    pipe = load_pipeline(write_pipeline_dir(st, main_steps(st, CHOICES), tmp_path / "main"), str(tmp_path / "s"))
    assert pipe.max_concurrent == 6
    assert all(pipe.launcher_of(s, pipe.train_config(s)) == "local" for s in pipe.steps if s.kind == "train")


def test_check_plans_select_then_main_once_choices_exist(tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["study", str(STUDY), "--store", store, "--check", "--work-dir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "select phase:" in out and "klsel2_fid" in out
    assert "main phase: planned after the select phase (its choices are not made yet)" in out
    write_choices(store, {**CHOICES, "validation": [{"kl_weight": 1e-4, "val_fid": 20.0}]})
    assert main(["study", str(STUDY), "--store", store, "--check", "--work-dir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "study choices (validation split): KL weight 0.0001 (val gFID by weight: 0.0001: 20.00)" in out
    plan, at_once = out.rstrip().rsplit("\n", 1)  # the last line: two steps at once (study.yaml's max_concurrent)
    assert at_once.startswith("steps at once: up to 2 (max_concurrent")
    assert "kl_equal_compute_s2_fid" in plan and plan.endswith(f"-> {store}/report/report; driver (local)")


def _metrics_row(store: Path, name: str, gflops: float):
    run = store / "runs" / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"images": 32, "loss": 1.0, "gflops_per_image": gflops}) + "\n")


def test_the_choices_come_from_validation_gfid_and_the_counted_flops(tmp_path):
    st = load_study(STUDY)
    store = tmp_path / "store"
    pipe = load_pipeline(write_pipeline_dir(st, select_steps(st), tmp_path / "select"), str(store))
    for i, fid in enumerate([31.0, 22.5, 40.0]):
        (store / "eval" / f"klsel{i}_fid").mkdir(parents=True)
        (store / "eval" / f"klsel{i}_fid" / "metrics.json").write_text(json.dumps({"fid": fid}))
    for name, g in [("teacher_s0", 2.0), ("tok_s0", 1.0), ("ref_s0", 0.5), ("dmd_s0", 3.0), ("dec_s0", 1.0),
                    ("klsel1_tok", 0.25), ("klsel1_dec", 1.0)]:
        _metrics_row(store, name, g)
    c = make_choices(st, pipe)
    assert c["kl_weight"] == 1e-4 and [v["val_fid"] for v in c["validation"]] == [31.0, 22.5, 40.0]
    images = {n: pipe.train_config(pipe.step(n)).total_images for n in
              ("teacher_s0", "tok_s0", "ref_s0", "dmd_s0", "dec_s0", "klsel1_tok", "klsel1_dec")}
    dmvae = 2.0 * images["teacher_s0"] + images["tok_s0"] + 0.5 * images["ref_s0"] + 3.0 * images["dmd_s0"] + \
        images["dec_s0"]
    assert c["dmvae_chain_gflops"] == pytest.approx(dmvae)
    batch = pipe.train_config(pipe.step("klsel1_tok")).batch_size
    want = (dmvae - 1.0 * images["klsel1_dec"]) / 0.25
    assert c["kl_equal_compute_images"] % batch == 0 and abs(c["kl_equal_compute_images"] - want) <= batch / 2


@pytest.mark.parametrize("edit, line", [
    ({"test": {"split": "val"}}, "validation.split and test.split are both 'val': choices would be made on the "
                                 "test split"),
    ({"data": {"source": "fashion-mnist", "split": "val"}}, "data.split and validation.split are both 'val'"),
    ({"arms": ["kl"]}, "arms: a list that holds dmvae"),
    ({"seeds": [0, 0]}, "seeds: a list of distinct integers, got [0, 0]"),
    ({"kl_weights": [0]}, "kl_weights: a non-empty list of positive numbers"),
    ({"stages": "."}, "lacks teacher.yaml"),
    ({"sedes": [1]}, "unknown key(s) ['sedes']"),
    ({"max_concurrent": 0}, "max_concurrent: a positive whole number of steps at once, got 0"),
    ({"launcher": "slurm"}, "launcher: one of ray, local, auto (where each step runs), got 'slurm'"),
    ({"curve_images": [0]}, "curve_images: a list of distinct positive image counts (generator checkpoints, "
                            "e.g. [51200]), got [0]"),
])
def test_a_study_that_would_choose_on_test_data_or_is_malformed_is_refused(tmp_path, edit, line):
    import yaml
    doc = yaml.safe_load((STUDY / "study.yaml").read_text())
    doc.update(edit)
    if "stages" not in edit:
        doc["stages"] = str(REPO / "configs" / "demo")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(PipelineError, match="^" + str(tmp_path / "study.yaml").replace(".", r"\.") + ": ") as err:
        load_study(tmp_path)
    assert line in str(err.value)
