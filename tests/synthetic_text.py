"""Synthetic English-like documents that pass every quality filter of utils/clean.py (random sentences of
common words, several lines each ending in a full stop), and the defects cleaning must find in a corpus."""

import random

WORDS = """time person year way day thing man world life hand part child eye woman place work week case point
government company number group problem fact the be to of and that have with the of and to that with river mountain
garden kitchen window letter market science history music teacher student village city country family friend
morning evening winter summer animal forest ocean island bridge street library museum doctor engineer farmer
writer painter builder sailor soldier captain judge lawyer nurse baker bright quiet careful gentle honest simple
famous ancient modern strange useful heavy narrow public private small large early late young old green yellow
carry follow answer remember travel explain discover protect measure collect describe prepare improve consider
quickly slowly often never always rarely almost nearly together inside outside between beneath across around
paper stone glass metal water light sound voice story question reason method result effect energy signal
machine engine station harbor valley meadow orchard cottage palace tower castle temple chapel cellar attic""".split()


def sentence(r):
    return " ".join(r.choice(WORDS) for _ in range(r.randint(9, 15))).capitalize() + "."


def document(r, lines=8):
    """~270 words in `lines` lines of 2-3 sentences."""
    return "\n".join(" ".join(sentence(r) for _ in range(r.randint(2, 3))) for _ in range(lines))


def exact_copy(text):
    """The same text to exact deduplication: other case and whitespace."""
    return text.upper().replace(" ", "  ").replace("\n", " \n ")


def near_copy(text, r, changed=3):
    """The text with `changed` words replaced: 5-gram Jaccard similarity ~0.9."""
    words = text.split(" ")
    for i in r.sample(range(len(words)), changed):
        words[i] = r.choice(["zebra", "umbrella", "violin", "saddle", "lantern"])
    return " ".join(words)


def boilerplate():
    return "Home\nAbout us\nContact\nPrivacy\n" * 10


def gibberish(r):
    return " ".join("".join(r.choice("qzxvkjwp") for _ in range(5)) for _ in range(200))


def with_passage_of(text, r):
    """A new document holding 20 consecutive words of `text` (a 13-gram match and more)."""
    return document(r, 3) + "\n" + " ".join(text.split()[20:40]) + ".\n" + document(r, 3)
