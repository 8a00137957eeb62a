"""Reports: the data (schema) and its renderings."""

from compress.report.render import render_markdown, write_report
from compress.report.schema import Report

__all__ = ["Report", "render_markdown", "write_report"]
