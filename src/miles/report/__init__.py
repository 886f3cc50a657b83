"""Documents, tables, plots and the ``miles report`` page of runs and studies.

- :mod:`miles.report.document`: the document model and the markdown/CSV/JSON writers;
- :mod:`miles.report.tables`: aggregation over seeds and the columns of every results table;
- :mod:`miles.report.plots`: the learning-dynamics figure and the bar charts;
- :mod:`miles.report.page`: ``build_report`` and the registry of renderers, one per study kind
  (:mod:`miles.report.renderers`), rendered to HTML by :mod:`miles.report.html`.

Nothing is imported here eagerly: the studies use the writers, and the renderers use the studies.
"""
