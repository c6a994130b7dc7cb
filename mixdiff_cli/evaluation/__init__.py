"""Reports: routing accuracy, expert specialisation, samples, and their figures."""

from mixdiff_cli.evaluation.charts import loss_figure, routing_figures
from mixdiff_cli.evaluation.experts import ExpertsSettings, evaluate_experts
from mixdiff_cli.evaluation.heldout import HeldoutLoss
from mixdiff_cli.evaluation.inputs import parse_data_specs
from mixdiff_cli.evaluation.markdown import experts_markdown, routing_markdown, samples_markdown
from mixdiff_cli.evaluation.metrics import BASE_LABEL, gates, loss_matrix_metrics, ranking, routing_metrics, topn_curve
from mixdiff_cli.evaluation.report import EvaluateError, GateFailed, Report, write_report
from mixdiff_cli.evaluation.routing import RoutingSettings, evaluate_routing
from mixdiff_cli.evaluation.samples import Sweep, clip_scores, evaluate_samples

__all__ = [
    "BASE_LABEL", "EvaluateError", "ExpertsSettings", "GateFailed", "HeldoutLoss", "Report", "RoutingSettings", "Sweep",
    "clip_scores", "evaluate_experts", "evaluate_routing", "evaluate_samples", "experts_markdown", "gates",
    "loss_figure", "loss_matrix_metrics", "parse_data_specs", "ranking", "routing_figures", "routing_markdown",
    "routing_metrics", "samples_markdown", "topn_curve", "write_report",
]
