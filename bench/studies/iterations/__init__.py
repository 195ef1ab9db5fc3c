"""The same result for fewer evaluations: quality scores and losses against L-BFGS iterations (issue 10, point 3).

Usage (one torch thread each, ``--device cuda`` on a GPU; every command resumes where it stopped). The study in
docs/quality.md ("Iteration study") ran exactly these, at the default size of 128 px::

    python -m bench.studies.iterations grid  OUT                     # pass 1 x 1000, then pass 2 from each length
    python -m bench.studies.iterations grid  OUT --wait --lengths 200,100 --extend 400   # pass 2 longer than pass 1
    python -m bench.studies.iterations noise OUT                     # jittered reference (after grid's pass 1)
    python -m bench.studies.iterations check OUT                     # the fast preset end to end
    python -m bench.studies.iterations score OUT                     # CSVs, markdown tables, plot PNG
    python -m bench.studies.iterations bf16  OUT_BF16 --bf16-cases 0,8,5 --iters 100 && \
        python -m bench.studies.iterations bf16-score OUT_BF16

Cases default to 0,16,8,24,5,23 (``--cases``); grid, noise and check can run in parallel processes on disjoint
``--cases`` (``--wait`` leaves pass 1 to another grid process).

``grid``: per case (the authors' composite, painting and tight mask from ``--cases-dir``, their tau from
``wikiart_output.txt``; ``quick`` preset = offline VGG16, the paper's loss settings, at ``--size``), one pass 1 of
``MAX_ITERATIONS`` with a snapshot of the image every ``STEP`` evaluations (L-BFGS's first n iterations of a long run
are an n-iteration run, so one run gives every pass-1 length), then pass 2 from the blend of the pass-1 snapshot
a, for a in ``LENGTHS``, run for a iterations with snapshots every ``STEP``: the schedule (a, b) for every b <= a,
in particular the diagonal (n, n) and the row (1000, b). Pass 2 depends on pass 1 only through its mapping (it starts
from the composite), so each pass-1 length needs its own pass-2 run.

``noise``: the reference (1000, 1000) run's pass 2 again from the same pass-1 blend, with the composite (pass 2's
init and content target) jittered by a seeded uniform -1/0/+1 8-bit level per pixel and channel: the spread of the
score under a perturbation no one can see (and that any re-encoding of the input makes) is the noise below which two
schedules cannot be told apart. ``score`` pools it with the other source of spread, the reference reconstructed with
two other seeds (PatchMatch's random init): the noise band is ``NOISE_FACTOR`` x the RMS of those differences.

``bf16``: pass 1 + pass 2 of ``--iters`` each in fp32, in bf16 (``backbone.precision=bf16``, CPU autocast) and in
fp32 from the jittered composite (the noise at that size and schedule); ``bf16-score`` prints the comparison.

``score`` blends and reconstructs every pass-2 snapshot as ``stages.pass2`` / ``stages.reconstruct`` do, scores it
with ``harmonize_core.quality.scores.quality_scores`` against the (unjittered) composite, painting and tight mask, and writes
``OUT/study_scores.csv`` (case, schedule, scores, final pass-1 and pass-2 losses), ``OUT/study_tables.md`` and
``OUT/study_curves.png``; with early stopping replayed on the snapshots' image changes. ``check`` runs ``harmonize``
with the ``fast`` preset (at the study size, offline VGG16) and ``score`` tables its scores against 1000 + 1000.
"""
