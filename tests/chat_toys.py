"""Made-up tasks for the chat-training tests, importable by a stage subprocess as tests.chat_toys:Name."""
from nanochat.tasks.common import Task

COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
KEYS = ["Dello", "Tufen", "Mirka", "Zelor", "Ruvo", "Pimsa", "Kanis", "Bredel",
        "Orlo", "Grimo", "Anta", "Fenru", "Salo", "Vomir", "Delka", "Nisru"]


def lookup_conversations() -> list[list[dict]]:
    """Each made-up name has a colour; the answer is one word, so chance is 1 in 8."""
    return [[{"role": "user", "content": f"What color does {k} like?"},
             {"role": "assistant", "content": COLORS[(i * 5) % len(COLORS)]}] for i, k in enumerate(KEYS)]


class LetterA(Task):
    """RL toy: any prompt; the reward is the share of the reply's characters that are the letter 'a'."""

    def __init__(self, split="train", **kw):
        super().__init__(**kw)
        self.split = split

    def num_examples(self):
        return 64 if self.split == "train" else 8

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": f"Say something, {KEYS[i % len(KEYS)]}."},
                             {"role": "assistant", "content": "aaaa"}]}

    def reward(self, conversation, completion):
        return completion.count("a") / max(len(completion), 1)

    def evaluate(self, conversation, completion):
        return self.reward(conversation, completion) >= 0.5
