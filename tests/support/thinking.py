"""A known reply for the demo model (settings.forced_output): a thinking, then an answer ending in a box."""

THOUGHT = "\nSubtract 1 from both sides: 2x = 6. Divide both sides by 2.\n"
ANSWER = "\n\nSo $x = 3$, and the final answer is \\boxed{x=3}."
FORCED = f"<think>{THOUGHT}</think>{ANSWER}"
QUESTION = "Solve 2x + 1 = 7 for x."
