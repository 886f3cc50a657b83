"""Tables and plots built from run results."""

from miles.report.tables import aggregate, markdown_table, summarize_run

__all__ = ["aggregate", "markdown_table", "summarize_run"]
