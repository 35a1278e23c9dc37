"""Post-mortem reports of a ``--record`` recording (``epwatch report``): the replay's
diagnosis with the figures behind it (pandas for the groupbys, matplotlib for the
drawing) in one self-contained HTML page, and a Chrome/Perfetto trace of the run.

Offline only: nothing on the collector's live path imports this package, and pandas
and matplotlib (the ``report`` extra) load only here.
"""
