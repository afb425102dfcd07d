"""A validation split for a VOC-layout set that has only trainval and test: a folder of symlinks to its
Annotations/ and JPEGImages/ whose ImageSets/Main/ holds a seeded train / val split of its trainval.

    python bench/validation_split.py --data ../shared/data/bccd --out /tmp/bccd-val [--val 51] [--seed 2026]
    rcnn run --config photos --data /tmp/bccd-val --set data.train_split=train --set data.test_split=val

Settings are chosen on such a split, never on test (docs/real-photos.md). trainval's ids, as the data
set reader lists them (first column, no repeats, file order), are shuffled by Python's
random.Random(seed) and the first --val of them are val.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from pipeline.data.voc import VOCDataset
from pipeline.engine.errors import UserError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the VOC-layout root with ImageSets/Main/trainval.txt")
    parser.add_argument("--out", type=Path, required=True, help="the new root (must not exist)")
    parser.add_argument("--val", type=int, default=51, help="images in val (default: 51, a fifth of BCCD's trainval)")
    parser.add_argument("--seed", type=int, default=2026, help="the shuffle's seed (default: 2026)")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out}: already exists; name a new folder")
    try:
        ids = VOCDataset(args.data).listed_ids("trainval")
    except UserError as error:
        raise SystemExit(str(error)) from None
    random.Random(args.seed).shuffle(ids)
    val, train = sorted(ids[:args.val]), sorted(ids[args.val:])
    (args.out / "ImageSets" / "Main").mkdir(parents=True)
    for folder in ("Annotations", "JPEGImages"):
        (args.out / folder).symlink_to((args.data / folder).resolve())
    for split, split_ids in (("train", train), ("val", val)):
        (args.out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))
    print(f"{args.out}: train {len(train)}, val {len(val)} images (seed {args.seed})")


if __name__ == "__main__":
    main()
