"""Benchmark records: machine and version stamps, Markdown tables, plots, the README section."""

from lmdistill.report.records import environment, markdown_table, plot_score_vs_cost, update_readme

__all__ = ["environment", "markdown_table", "plot_score_vs_cost", "update_readme"]
