"""A whole recipe as one command: `dmvae-scale pipeline CONFIG_DIR --store URL` runs shards, the stages, the latent
cache, sampling and evaluation, every output under one store (a local directory or s3://bucket/prefix).

spec.py   the specification (pipeline.yaml's steps and what they read, the store layout, overrides, the launcher
          rule applied), checked on the user's machine before anything runs
state.py  whether a step's output is complete and current (skip, resume, redo or refuse)
steps.py  what each kind of step does; report.py the report step
run.py    running the steps, one line each and a closing table
The pipeline stands above train/ and eval/: it runs both, and neither imports it.
"""
from .run import StepReport, format_reports, plan, run_pipeline
from .spec import LAYOUT, PIPELINE_FILE, STEP_INPUTS, Pipeline, PipelineError, Step, artifact_id, load_pipeline
from .state import step_complete, work_dir_for

__all__ = ["LAYOUT", "PIPELINE_FILE", "STEP_INPUTS", "Pipeline", "PipelineError", "Step", "StepReport",
           "artifact_id", "format_reports", "load_pipeline", "plan", "run_pipeline", "step_complete", "work_dir_for"]
