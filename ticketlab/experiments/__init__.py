"""The paper's experiments on top of the core: baselines, matching over seeds, transfer,
rewinding, mask analysis, sweeps and the one-command reproduction.

Everything here is built from the core's public pieces — :func:`ticketlab.experiment.prepare`,
:func:`ticketlab.train.train`/``evaluate``, :func:`ticketlab.imp.find_ticket`/``finetune``,
:mod:`ticketlab.pruning` and the run store — and writes into the same store with the same
conventions (a level is finished when its ``metrics.json`` is), so every experiment resumes
where it stopped and a report can always be rebuilt from the store alone.

Modules, in the order the paper uses them:

- :mod:`.baselines`: the baselines of Table 2 as *branches* of an IMP run (open_lth's word): the
  IMP mask or a random one, on θ0, on re-initialised or shuffled weights, one-shot, standard.
- :mod:`.matching`: seeds, mean ± std, the matching rule and Table 2 (Markdown, CSV, LaTeX).
- :mod:`.transfer`: Figure 2, every source task's mask fine-tuned on every target task.
- :mod:`.rewinding`: IMP with rewinding to θ_i for a sweep of i.
- :mod:`.analysis`: where the masks prune (per matrix, per layer) and how much they overlap.
- :mod:`.sweep`: a TOML grid of cells run in-process or on Ray, skipping finished cells.
- :mod:`.reproduce`: the ``small`` and ``paper`` presets and the report folder.
"""
