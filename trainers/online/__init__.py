"""Online training: the policy samples, a judge or reward scores, the policy learns, repeat.

Trainers: ``ppo`` (3.1.2), ``rloo`` (eq. 48), ``iterative`` (iterative DPO, self-rewarding,
pairwise CRINGE, SPPO, DNO: generate-judge-train rounds), ``nash_md`` (3.13), ``paft`` and
``dro_v`` (DRO with a value network). What they share is split by concern: ``rollout``
(sampling, scoring and evaluating through the flow's generator), ``checkpointing`` (atomic
checkpoints a killed run resumes from), ``runs`` (setting a run up, resuming it, closing its
report) and ``termination`` (when to stop iterating). Token encoding and the optimizer step,
which offline trainers use too, live one level up in ``trainers.encoding`` / ``trainers.modeling``.
"""
