"""Online / iterative alignment: shared rollout machinery and the generate-judge-train loops.

``rollout`` holds what every on-policy method needs (tokenising prompts + sampled responses,
per-token log-probs, KL to the reference, evaluation); ``loop`` the iterative methods
(iterative DPO, self-rewarding, pairwise CRINGE, SPPO, DNO); ``nash_md``, ``paft`` and
``termination`` the rest. PPO and RLOO live in ``trainers.ppo`` / ``trainers.rloo``.
"""
