"""Looking at runs: `deltatune report` (one run as HTML + markdown) and the page of a method comparison.

plots.py draws PNGs with matplotlib (Agg); page.py lays sections out as one self-contained HTML file and as
markdown; run_report.py gathers what one run directory holds; compare_page.py renders a comparison.
"""

from deltatune.reports.compare_page import pareto_front, write_compare
from deltatune.reports.run_report import collect, write_report

__all__ = ["collect", "pareto_front", "write_compare", "write_report"]
