"""Reports: report.json, a self-contained report.html with plots, and model cards."""
