"""Human evaluation as in the paper: pairwise preference of two systems, two questions, majority vote.

``package`` turns two generate-style folders into a rater-facing package (offline task pages, MTurk
batch files) plus a key kept apart; ``aggregate`` reads the answers back into the paper's table;
``stats`` holds the Wilson interval and Fleiss' kappa. Nothing here knows about DVC or Prefect.
"""
