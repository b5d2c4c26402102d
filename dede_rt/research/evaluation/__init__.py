"""``dede-rt eval``: victims -> plan (embeddings, jobs) -> execute -> collect -> report.

``run_eval(config, out=...)`` chains the stages; each stage is public for finer use:
``plan_eval(config, sets=, runs=) -> EvalPlan``, ``execute(job) -> JobResult``, ``collect(plan, results)``.
"""

from dede_rt.research.evaluation.collect import Collected, collect
from dede_rt.research.evaluation.config import EVAL_DECODER, EvalConfig
from dede_rt.research.evaluation.execute import JobResult, execute, execute_all
from dede_rt.research.evaluation.pipeline import eval_encoders, load_data, run_eval
from dede_rt.research.evaluation.plan import (AssetJob, BaselineJob, DecoderJob, DecreeJob, EncoderRun, EvalPlan,
                                              EvalSets, Job, ProbeJob, check_eval_data, encoder_run, plan_eval)
from dede_rt.research.evaluation.victims import EvalData, VictimConfig, eval_data, load_eval_data

__all__ = ["EvalConfig", "EVAL_DECODER", "VictimConfig", "EvalData", "eval_data", "load_eval_data", "load_data",
           "eval_encoders", "run_eval", "EvalSets", "EncoderRun", "encoder_run", "check_eval_data", "plan_eval",
           "EvalPlan", "Job", "ProbeJob", "BaselineJob", "DecoderJob", "DecreeJob", "AssetJob", "execute",
           "execute_all", "JobResult", "collect", "Collected"]
