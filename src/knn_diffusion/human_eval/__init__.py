"""Human evaluation as in the paper: pairwise preference of two systems, two questions, majority vote.

``package`` turns two generate-style folders into a rater-facing package (offline task pages, MTurk
batch files) plus a key kept apart; ``aggregate`` reads the answers back into the paper's table.
"""

from knn_diffusion.human_eval.aggregate import Report, ResultsError, aggregate, markdown_table
from knn_diffusion.human_eval.package import QUESTIONS, make_pairs, package_size, read_system, write_package

__all__ = ["QUESTIONS", "Report", "ResultsError", "aggregate", "make_pairs", "markdown_table", "package_size",
           "read_system", "write_package"]
