"""A pretraining corpus nanochat writes itself, so the demo profile runs with no network at all.

The text is generated from a seed: a small made-up world (people and animals with homes, colours,
foods, ages and friends) described over and over in fact sheets, question/answer pairs and short
stories, plus arithmetic and counting. It has real structure a tiny model can pick up in a few CPU
minutes: the same facts recur across documents, sums are right, counts go up by one.

    python -m nanochat.demo_corpus --dir ~/.cache/nanochat/demo_data
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from nanochat.common import atomic_write

SYLLABLES = ["ta", "lo", "mir", "bre", "vo", "ka", "nis", "del", "ru", "fen", "sa", "pim", "or", "zel", "mo", "gri", "an", "tu"]
KINDS = ["fox", "baker", "robot", "dragon", "farmer", "cat", "sailor", "owl", "painter", "goat"]
TOWNS = ["Varnel", "Oskbury", "Tillow", "Mereth", "Quenford", "Dunmore", "Palisk", "Rowanby"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
FOODS = ["bread", "apples", "soup", "cheese", "rice", "carrots", "honey", "fish", "plums"]
PLACES = ["the park", "the river", "the market", "the old mill", "the hill", "the library", "the harbour"]
FEELINGS = ["happy", "tired", "hungry", "curious", "brave", "sleepy"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]


def a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def make_world(rng: random.Random, n_entities: int = 48) -> list[dict]:
    names = set()
    while len(names) < n_entities:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize())
    names = sorted(names)
    rng.shuffle(names)
    world = [dict(name=n, kind=rng.choice(KINDS), town=rng.choice(TOWNS), color=rng.choice(COLORS),
                  food=rng.choice(FOODS), age=rng.randint(2, 20)) for n in names]
    for i, e in enumerate(world):  # friendships pair up neighbours in the shuffled order
        e["friend"] = world[i ^ 1]["name"] if (i ^ 1) < len(world) else world[0]["name"]
    return world


def fact_sheet(rng, e):
    facts = [f"{e['name']} is {a(e['kind'])} who lives in {e['town']}.",
             f"{e['name']} likes the color {e['color']}.",
             f"The favourite food of {e['name']} is {e['food']}.",
             f"{e['name']} is {NUMBER_WORDS[e['age']]} years old.",
             f"The best friend of {e['name']} is {e['friend']}."]
    rest = facts[1:]
    rng.shuffle(rest)  # the first sentence introduces; the rest come in any order
    return f"About {e['name']}\n\n" + " ".join([facts[0]] + rest)


def world_qa(e: dict) -> list[tuple[str, str]]:
    """Question/answer pairs about one entity (the chat tasks ask the same questions)."""
    return [(f"Where does {e['name']} live?", f"{e['name']} lives in {e['town']}."),
            (f"What does {e['name']} like to eat?", f"{e['name']} likes to eat {e['food']}."),
            (f"How old is {e['name']}?", f"{e['name']} is {NUMBER_WORDS[e['age']]} years old."),
            (f"Who is the best friend of {e['name']}?", f"The best friend of {e['name']} is {e['friend']}."),
            (f"What kind of creature is {e['name']}?", f"{e['name']} is {a(e['kind'])}."),
            (f"What color does {e['name']} like?", f"{e['name']} likes {e['color']}.")]


def questions(rng, world):
    return "\n\n".join("Q: %s\nA: %s" % rng.choice(world_qa(e)) for e in rng.sample(world, 4))


def story(rng, world, by_name):
    e = rng.choice(world)
    f = by_name[e["friend"]]
    place, feeling = rng.choice(PLACES), rng.choice(FEELINGS)
    n = rng.randint(2, 9)
    return (f"One morning, {e['name']} the {e['kind']} woke up in {e['town']} feeling {feeling}. "
            f"{e['name']} put on {a(e['color'])} coat and walked to {place}. "
            f"There, {e['name']} met {f['name']} the {f['kind']}. "
            f"{f['name']} had {NUMBER_WORDS[n]} {f['food']} and gave one to {e['name']}, so {f['name']} had "
            f"{NUMBER_WORDS[n - 1]} left. "
            f"They talked about {e['town']} and {f['town']} until the sun went down. "
            f"Then {e['name']} went home and ate some {e['food']}. The end.")


def arithmetic(rng):
    lines = []
    for _ in range(rng.randint(6, 12)):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        op = rng.choice(["plus", "minus", "times"])
        if op == "minus" and b > a:
            a, b = b, a
        c = a + b if op == "plus" else a - b if op == "minus" else a * b
        lines.append(rng.choice([f"{a} {op} {b} is {c}.", f"What is {a} {op} {b}? It is {c}.",
                                 f"{a} {dict(plus='+', minus='-', times='*')[op]} {b} = {c}"]))
    return "\n".join(lines)


def counting(rng):
    if rng.random() < 0.5:
        start = rng.randint(0, 8)
        end = rng.randint(start + 4, 20)
        return f"Let us count from {NUMBER_WORDS[start]} to {NUMBER_WORDS[end]}: " + ", ".join(NUMBER_WORDS[start:end + 1]) + "."
    start, step = rng.randint(0, 50), rng.randint(1, 5)
    nums = [start + step * k for k in range(rng.randint(5, 12))]
    return f"Counting up by {step} from {start}: " + ", ".join(map(str, nums)) + "."


def make_documents(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    world = make_world(random.Random(seed))  # the world depends only on the seed, not on n_docs
    by_name = {e["name"]: e for e in world}
    makers = [(0.25, lambda: fact_sheet(rng, rng.choice(world))), (0.2, lambda: questions(rng, world)),
              (0.3, lambda: story(rng, world, by_name)), (0.15, lambda: arithmetic(rng)), (0.1, lambda: counting(rng))]
    weights = [w for w, _ in makers]
    docs = []
    for _ in range(n_docs):
        # a document is one to three pieces of the same kind, so lengths vary like real text
        _, make = rng.choices(makers, weights)[0]
        docs.append("\n\n".join(make() for _ in range(rng.randint(1, 3))))
    return docs


def make_demo_corpus(data_dir: str | os.PathLike, n_docs: int = 12_000, seed: int = 0, docs_per_shard: int = 2_000,
                     row_group_size: int = 256) -> list[Path]:
    """Write shard_00000.parquet ... (train) and a last, smaller shard (val) into data_dir.

    Each shard is written under a temporary name and renamed, so a reader never sees half a file.
    Returns the shard paths in order; the last one is the validation split.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    if n_docs < 2:
        raise ValueError(f"n_docs={n_docs} is too small: need at least 2 documents (one train, one val)")
    data_dir = Path(data_dir).expanduser()
    marker = data_dir / ".demo_corpus"  # hidden, so list_data_files ignores it
    if data_dir.is_dir() and not marker.exists() and any(data_dir.iterdir()):
        raise FileExistsError(f"{data_dir} is not empty and holds no demo corpus; give an empty or new directory")
    data_dir.mkdir(parents=True, exist_ok=True)
    docs = make_documents(n_docs, seed)
    n_val = max(1, min(docs_per_shard, n_docs // 20))
    train, val = docs[:-n_val], docs[-n_val:]
    chunks = [train[i:i + docs_per_shard] for i in range(0, len(train), docs_per_shard)] + [val]
    paths = []
    for i, chunk in enumerate(chunks):
        path = data_dir / f"shard_{i:05d}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(pa.table({"text": chunk}), tmp, row_group_size=row_group_size)
        os.replace(tmp, path)
        paths.append(path)
    for stale in sorted(data_dir.glob("shard_*.parquet"))[len(paths):]:
        stale.unlink()  # a previous, larger demo corpus would otherwise leave its extra shards behind
    atomic_write(marker, json.dumps({"n_docs": n_docs, "seed": seed}) + "\n")
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nanochat.demo_corpus", description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="directory to write the parquet shards into")
    ap.add_argument("--docs", type=int, default=12_000, help="number of documents")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths = make_demo_corpus(args.dir, n_docs=args.docs, seed=args.seed)
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} shards ({size / 1e6:.1f} MB, {args.docs} documents) to {args.dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
