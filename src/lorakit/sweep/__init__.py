"""`lorakit sweep`: many training runs over a grid (or an Optuna search) of config values, ranked and plotted.

grid.py (the axes, expanded and checked against the config), search.py (Optuna's TPE), state.py
(sweep.json), runner.py (one trial: train, then evaluate; worker processes), evaluate.py (what a
trial reports, through eval.compare), results.py (ranking, best, Pareto front, sweep.csv),
page.py (sweep.html), command.py (the command: check, resume, run, write).
"""
