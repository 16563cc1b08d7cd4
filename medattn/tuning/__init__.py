"""Hyper-parameter search with Optuna (seed 001 searches K, lambda, E and weight decay).

- :mod:`~medattn.tuning.space`: ``tune.space`` of params.yaml, checked; a trial's values -> fit()'s params
- :mod:`~medattn.tuning.storage`: journal file (default) or RDB URL; heartbeat + retry of a dead worker's trial
- :mod:`~medattn.tuning.objective`: one trial = one ``fit`` scored on the validation split, pruned per epoch
- :mod:`~medattn.tuning.tracking`: MLflow parent run per study, nested run per trial
- :mod:`~medattn.tuning.study`: create / resume a study; one worker's loop
- :mod:`~medattn.tuning.workers`: N local worker processes, a GPU each on GPU hosts
- :mod:`~medattn.tuning.report`: best params, trial table, Optuna's plots
- :mod:`~medattn.tuning.search`: ``run_search``, what ``medattn tune`` and the DVC stage call

Importing this package is cheap (config validation imports ``space``); Optuna loads with the modules that need it.
"""
