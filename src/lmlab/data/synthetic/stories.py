"""The ``stories`` world: short English-like narratives from a probabilistic grammar.

Why this world: a ~2M-parameter model should learn something real from it in minutes on a CPU,
so the text has strong, learnable structure (a small set of story arcs, recurring sentence frames,
consistent facts) over a lexicon large enough (``LEXICON``, over 1,000 distinct words) that it is
not trivial. Long-range dependencies a model can learn:

* gender agreement: every named character has a fixed gender (the name lists are split by gender),
  and subject/possessive/object pronouns agree with it (he/his/him, she/her/her, they/their/them,
  with "was"/"were" agreeing too);
* consistent facts: a story fixes the hero's home town, pet (kind and name) and a found object (colour
  and kind), and later sentences refer back to them ("the red kite that Mia found");
* arcs: beginning, problem, one to three attempts, resolution and a moral, with dialogue in quotes.

A pronoun is used as a sentence's subject only when the previous sentence's subject (or the speaker
of the previous line of dialogue) is the same character; ``story_sentences`` exposes the sentences so
tests can check that rule.

Every document is a pure function of ``(seed, index)``: ``random.Random(f"{seed}:{index}")`` drives it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from lmlab.data.synthetic import register_world

# --------------------------------------------------------------------------- lexicon


def _words(text: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in text.split(",") if w.strip())


FEMALE_NAMES = _words(
    """Mia, Lily, Emma, Ava, Zoe, Lucy, Ella, Grace, Ruby, Chloe, Anna, Sophie, Hannah, Alice, Clara, Nora,
    Ivy, Rosa, Maya, Lena, Sara, Julia, Olive, Hazel, Iris, Daisy, Fiona, Greta, Helen, Ingrid, Jane, Kate,
    Laura, Molly, Nina, Paula, Rita, Tara, Una, Vera, Wendy, Yara, Zelda, Amber, Bella, Carla, Dora, Edith,
    Freya, Gemma, Holly, Isla, Joy, Kira, Leah, Mabel, Nell, Opal, Pearl, Quinn"""
)
MALE_NAMES = _words(
    """Leo, Max, Sam, Tom, Ben, Jack, Noah, Liam, Oscar, Hugo, Felix, Theo, Finn, Jonah, Adam, Eli, Omar,
    Ivan, Carlos, Diego, Emil, Frank, George, Henry, Isaac, James, Karl, Lars, Marco, Nick, Otto, Peter,
    Ralph, Simon, Tim, Victor, Walter, Xavier, Yusuf, Zack, Arlo, Bruno, Caleb, Dev, Ezra, Gus, Hank, Jasper,
    Kai, Luca, Milo, Ned, Owen, Pablo, Rex, Seth, Ted, Vince, Wade, Yuri"""
)
NEUTRAL_NAMES = _words(
    """Alex, Robin, Charlie, Jordan, Riley, Sky, Ash, River, Sage, Rowan, Remy, Jules, Ari, Blair, Casey,
    Drew, Emery, Frankie, Hayden, Indigo, Jamie, Kit, Lane, Morgan, Noel, Oakley, Parker, Reese, Shay, Toby"""
)
PET_NAMES = _words(
    """Biscuit, Pepper, Button, Whiskers, Patch, Noodle, Pickle, Socks, Shadow, Sunny, Marble, Pebble,
    Waffle, Mochi, Tofu, Ginger, Bubbles, Fudge, Cookie, Clover, Dusty, Fluffy, Goldie, Jelly, Lucky,
    Muffin, Nutmeg, Peanut, Rusty, Snowball, Tiger, Ziggy, Bean, Coco, Dot, Echo, Fig, Gizmo, Hopper, Kiwi"""
)
TOWNS = _words(
    """Millbrook, Oakhill, Riverton, Stonebridge, Greenfield, Maplewood, Ashford, Brightwater, Cedarvale,
    Dunmore, Elmstead, Fairhaven, Glenrock, Hollowmere, Ivydale, Juniper Bay, Kingsford, Larkspur, Moorfield,
    Northgate, Oldcastle, Pinecrest, Queensbury, Redcliff, Silverlake, Thornbury, Upton, Valemont, Willowby,
    Yarrow, Amberlee, Bramblewick, Clearwater, Deepdale, Eastwick, Foxhollow, Goldcrest, Heathrow Fields,
    Ironwood, Kettlewell, Lowmoor, Meadowbank, Nettlecombe, Orchard Hill, Puddleby, Rosewood, Sandport,
    Tidewater, Underhill, Windermere"""
)
ANIMALS = _words(
    """dog, cat, rabbit, hamster, parrot, turtle, goldfish, puppy, kitten, pony, duck, goose, hen, goat,
    lamb, pig, mouse, frog, lizard, owl, hedgehog, squirrel, fox, crow, robin, sparrow, canary, ferret,
    guinea pig, tortoise, snail, beetle, ladybug, butterfly, donkey, calf, chick, bat, badger, otter,
    raccoon, deer, fawn, swan, pigeon, magpie, gecko, newt, crab, seal"""
)
OBJECTS = _words(
    """kite, ball, hat, scarf, book, lamp, key, ring, map, drum, flute, box, basket, blanket, boat, bucket,
    button, candle, clock, coin, compass, crown, cup, doll, feather, flag, glove, hammer, jar, kettle,
    ladder, lantern, letter, mirror, mitten, necklace, notebook, paintbrush, pencil, pillow, plate, puzzle,
    ribbon, robot, rope, shell, shoe, shovel, sled, spoon, stamp, stone, sweater, teapot, telescope, ticket,
    toy train, trumpet, umbrella, vase, wagon, wand, watch, whistle, yo-yo, backpack, balloon, bell, bicycle,
    bracelet, brush, camera, crayon, fan, fishing rod, globe, guitar, helmet, jacket, jigsaw, marble, medal,
    mug, paper boat, piano, postcard, radio, rocket, sandal, skateboard, sock, spinning top, sticker, sword,
    tent, violin"""
)
FOODS = _words(
    """apple, pear, plum, cherry, banana, orange, grape, lemon, peach, melon, berry, strawberry, carrot,
    potato, tomato, pumpkin, bean, pea, corn, cabbage, onion, bread, cake, pie, cookie, muffin, pancake,
    waffle, biscuit, bun, soup, stew, rice, noodle, cheese, egg, honey, jam, milk, butter, yogurt, porridge,
    sandwich, pizza, candy, chocolate, popcorn, pretzel, nut, cupcake"""
)
PLACES = _words(
    """bakery, library, market, park, garden, river, forest, beach, hill, meadow, pond, lake, barn, farm,
    castle, tower, bridge, station, harbor, school, museum, zoo, cave, field, orchard, square, mill,
    lighthouse, island, valley, mountain, shop, kitchen, attic, cellar, shed, playground, workshop, theater,
    stable, greenhouse, fountain, well, swamp, jungle, desert, village, camp, dock, chapel"""
)
COLORS = _words(
    """red, blue, green, yellow, orange, purple, pink, white, black, brown, gray, golden, silver, violet,
    crimson, teal, navy, amber, ivory, scarlet, turquoise, lavender, maroon, olive, beige"""
)
ADJECTIVES = _words(
    """little, big, tiny, huge, old, new, young, shiny, dusty, soft, hard, warm, cold, bright, dark, quiet,
    loud, happy, sad, brave, shy, clever, kind, gentle, funny, curious, busy, lazy, sleepy, hungry, tired,
    strong, small, tall, short, round, square, heavy, light, smooth, rough, fuzzy, fluffy, sticky, wet, dry,
    clean, dirty, broken, strange, magic, secret, special, lovely, pretty, ugly, wild, calm, proud, careful,
    friendly, grumpy, silly, smart, swift, slow, eager, patient, cheerful, gloomy, noisy, polite, rude,
    honest, sneaky, wise, foolish, bold, timid, lucky, lonely, famous, plain, fancy, cozy, chilly, sunny,
    rainy, windy, stormy, foggy, snowy, muddy, sandy, rocky, grassy, leafy, spooky, sparkly, wooden, paper,
    glass, woolen, striped, spotted, tidy, messy, crooked, hollow, ancient, gigantic, mighty, delicate,
    fragile, precious, ordinary, peculiar, mysterious, marvelous, wonderful, terrible, splendid, humble,
    nervous, jolly, merry, playful, restless, sturdy, thirsty, weary, zealous"""
)
CHARACTER_ADJECTIVES = _words(
    """brave, shy, clever, kind, gentle, funny, curious, busy, cheerful, careful, friendly, grumpy, silly,
    smart, eager, patient, honest, wise, bold, timid, lucky, lonely, proud, playful, restless, quiet, jolly"""
)
FEELINGS = _words(
    """happy, sad, scared, angry, worried, excited, proud, surprised, calm, nervous, glad, upset, lonely,
    hopeful, curious, grateful, relieved, confused, brave, tired, cheerful, gloomy, jealous, embarrassed,
    thrilled, amazed, puzzled, ashamed, joyful, content"""
)
# (base, past) pairs of verbs that take a place as "to the PLACE" or stand alone as activities.
ACTIVITIES = (
    ("play", "played"),
    ("run", "ran"),
    ("swim", "swam"),
    ("sing", "sang"),
    ("dance", "danced"),
    ("read", "read"),
    ("draw", "drew"),
    ("paint", "painted"),
    ("climb", "climbed"),
    ("jump", "jumped"),
    ("walk", "walked"),
    ("skip", "skipped"),
    ("hop", "hopped"),
    ("fish", "fished"),
    ("cook", "cooked"),
    ("bake", "baked"),
    ("build", "built"),
    ("explore", "explored"),
    ("sail", "sailed"),
    ("ride", "rode"),
    ("dig", "dug"),
    ("hum", "hummed"),
    ("whistle", "whistled"),
    ("rest", "rested"),
    ("nap", "napped"),
    ("write", "wrote"),
    ("knit", "knitted"),
    ("garden", "gardened"),
    ("wander", "wandered"),
    ("race", "raced"),
    ("skate", "skated"),
    ("hike", "hiked"),
    ("study", "studied"),
    ("practice", "practiced"),
    ("laugh", "laughed"),
    ("splash", "splashed"),
    ("roll", "rolled"),
    ("spin", "spun"),
    ("tumble", "tumbled"),
    ("wait", "waited"),
)
# (base, past) pairs of verbs that take an object: "VERB the OBJECT".
HANDLE_VERBS = (
    ("carry", "carried"),
    ("hold", "held"),
    ("polish", "polished"),
    ("fix", "fixed"),
    ("share", "shared"),
    ("show", "showed"),
    ("hide", "hid"),
    ("wrap", "wrapped"),
    ("clean", "cleaned"),
    ("hug", "hugged"),
    ("keep", "kept"),
    ("guard", "guarded"),
    ("paint", "painted"),
    ("wash", "washed"),
    ("check", "checked"),
    ("touch", "touched"),
    ("lift", "lifted"),
    ("throw", "threw"),
    ("catch", "caught"),
    ("bring", "brought"),
    ("take", "took"),
    ("fold", "folded"),
    ("shake", "shook"),
    ("mend", "mended"),
    ("find", "found"),
    ("lose", "lost"),
    ("drop", "dropped"),
    ("grab", "grabbed"),
    ("borrow", "borrowed"),
    ("return", "returned"),
    ("trade", "traded"),
    ("sell", "sold"),
    ("buy", "bought"),
    ("make", "made"),
    ("decorate", "decorated"),
    ("count", "counted"),
    ("admire", "admired"),
    ("test", "tested"),
    ("open", "opened"),
    ("close", "closed"),
)
# Verbs of searching, used in the attempts of an arc: "NAME VERB_PAST PREP the PLACE".
SEARCH_VERBS = (
    ("look", "looked", "in"),
    ("search", "searched", "near"),
    ("peek", "peeked", "behind"),
    ("check", "checked", "under"),
    ("hunt", "hunted", "around"),
    ("dig", "dug", "beside"),
    ("crawl", "crawled", "under"),
    ("climb", "climbed", "up"),
    ("run", "ran", "to"),
    ("hurry", "hurried", "to"),
    ("tiptoe", "tiptoed", "into"),
    ("wander", "wandered", "through"),
)
ADVERBS = _words(
    """quickly, slowly, quietly, loudly, happily, sadly, carefully, gently, bravely, softly, suddenly,
    finally, eagerly, patiently, proudly, nervously, cheerfully, angrily, calmly, kindly, politely,
    sleepily, busily, bravely, boldly, shyly, wisely, gladly, warmly, brightly, proudly, secretly"""
)
TIMES = _words(
    """One morning, One afternoon, One evening, One day, One night, Early the next day, On a rainy Monday,
    On a sunny Tuesday, On a windy Wednesday, On a cold Thursday, On a warm Friday, On a snowy Saturday,
    On a quiet Sunday, Last spring, Last summer, Last autumn, Last winter, At dawn, At noon, At sunset"""
)
WEATHER = _words(
    """a storm, a strong wind, heavy rain, a thick fog, a sudden snowfall, a loud thunderstorm, a flood,
    a hailstorm, a heat wave, a blizzard"""
)
MORALS = (
    "it is good to ask friends for help",
    "patience can solve many problems",
    "being kind is better than being right",
    "sharing makes everyone happier",
    "small steps can lead to big changes",
    "honesty is always the best choice",
    "courage means trying even when you are afraid",
    "a true friend stays with you when things are hard",
    "looking carefully helps you find what you need",
    "working together makes hard tasks easy",
    "it is never too late to say sorry",
    "every problem has a way out if you keep trying",
    "home is where the people who love you are",
    "it is wise to take care of your things",
    "listening is as important as talking",
    "mistakes help us learn",
)
SPEECH_VERBS = ("said", "asked", "shouted", "whispered", "replied", "cried", "called", "answered")
_STATEMENT_VERBS = ("said", "replied", "answered", "whispered", "called")
# Foods that take no plural ("some honey", not "some honeys").
MASS_FOODS = frozenset(
    "bread cake pie soup stew rice cheese honey jam milk butter yogurt porridge pizza candy chocolate popcorn corn".split()
)

# Every distinct word this grammar can produce, lower-cased (names and multi-word entries split).
_FRAME_WORDS = _words(
    """once, upon, a, time, in, the, town, of, there, lived, named, was, were, who, had, liked, to, with,
    and, but, then, first, next, at, last, from, that, day, on, always, never, learned, moral, story, is,
    he, she, they, his, her, their, him, them, himself, herself, themselves, girl, boy, kid, child, friend,
    found, near, gone, not, there, it, help, me, my, you, your, we, our, let's, go, can, could, would,
    where, what, why, how, did, see, seen, yes, no, thank, thanks, so, very, too, also, again, back,
    after, before, while, because, everyone, everything, nothing, something, home, house, smiled, nodded,
    sighed, frowned, felt, wanted, tried, decided, took, gave, made, came, went, saw, knew, thought,
    this, an, for, by, under, into, behind, around, beside, up, through, be, are, am, i, will, all, were,
    best, new, great, idea, look, lost, together, hugged, big, little, end, morning, evening, night,
    dear, oh, wow, hello, goodbye, please, sorry, of course, right, now, soon, later, today, tomorrow,
    about, along, anyone, ate, away, beautiful, blocked, cannot, clear, contest, done, down, faster, get,
    give, going, have, heard, helped, left, let, long, met, missed, over, packed, past, path, playing,
    prize, road, safe, sat, second, sitting, sleep, smiling, some, stuck, sun, visit, which, win, won"""
)


def _plural(noun: str) -> str:
    """English plural of a food noun for "some X" (mass nouns stay singular)."""
    if noun in MASS_FOODS:
        return noun
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith(("s", "sh", "ch", "x", "o")):
        return noun + "es"
    return noun + "s"


def _split_lexicon(*groups: tuple) -> frozenset[str]:
    words: set[str] = set()
    for group in groups:
        for item in group:
            parts = item if isinstance(item, tuple) else (item,)
            for part in parts:
                for w in re.findall(r"[A-Za-z'-]+", part):
                    words.add(w.lower())
    return frozenset(words)


LEXICON: frozenset[str] = _split_lexicon(
    FEMALE_NAMES, MALE_NAMES, NEUTRAL_NAMES, PET_NAMES, TOWNS, ANIMALS, OBJECTS, FOODS, PLACES, COLORS,
    ADJECTIVES, CHARACTER_ADJECTIVES, FEELINGS, ACTIVITIES, HANDLE_VERBS, SEARCH_VERBS, ADVERBS, TIMES,
    WEATHER, MORALS, SPEECH_VERBS, _FRAME_WORDS, tuple(_plural(f) for f in FOODS),
)  # fmt: skip

# --------------------------------------------------------------------------- characters


@dataclass(frozen=True)
class Pronouns:
    subj: str  # he / she / they
    obj: str  # him / her / them
    poss: str  # his / her / their
    refl: str  # himself / herself / themselves
    be: str  # was / were (past tense of "to be" agreeing with subj)
    kind: str  # boy / girl / kid


PRONOUNS = {
    "m": Pronouns("he", "him", "his", "himself", "was", "boy"),
    "f": Pronouns("she", "her", "her", "herself", "was", "girl"),
    "n": Pronouns("they", "them", "their", "themselves", "were", "kid"),
}
NAME_GENDER: dict[str, str] = {
    **{n: "f" for n in FEMALE_NAMES},
    **{n: "m" for n in MALE_NAMES},
    **{n: "n" for n in NEUTRAL_NAMES},
}
_ALL_NAMES = FEMALE_NAMES + MALE_NAMES + NEUTRAL_NAMES


@dataclass
class Character:
    name: str
    gender: str  # "m" | "f" | "n"
    trait: str

    @property
    def p(self) -> Pronouns:
        return PRONOUNS[self.gender]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# --------------------------------------------------------------------------- the grammar


class _Teller:
    """Builds one story from one RNG. ``last`` is the character who was the subject of the previous
    sentence; only that character may be referred to by a subject pronoun."""

    def __init__(self, rng: random.Random):
        self.r = rng
        self.sentences: list[str] = []
        self.last: Character | None = None
        c = rng.choice
        name = c(_ALL_NAMES)
        self.hero = Character(name, NAME_GENDER[name], c(CHARACTER_ADJECTIVES))
        friend = c(_ALL_NAMES)
        while friend == name:
            friend = c(_ALL_NAMES)
        self.friend = Character(friend, NAME_GENDER[friend], c(CHARACTER_ADJECTIVES))
        self.town = c(TOWNS)
        self.pet_kind = c(ANIMALS)
        self.pet_name = c(PET_NAMES)
        self.obj_color = c(COLORS)
        self.obj = c(OBJECTS)
        self.obj_place = c(PLACES)
        self.food = c(FOODS)
        self.food_pl = _plural(self.food)
        self.food_it = "it" if self.food_pl == self.food else "them"
        self.hobby = c(ACTIVITIES)

    # ---- helpers
    def say(self, text: str, subject: Character | None) -> None:
        self.sentences.append(_cap(text))
        self.last = subject

    def subj(self, ch: Character) -> str:
        """The character's name, or a pronoun when they were the previous sentence's subject."""
        if self.last is ch and self.r.random() < 0.6:
            return ch.p.subj
        return ch.name

    def be(self, ch: Character, subject_word: str) -> str:
        return ch.p.be if subject_word == ch.p.subj else "was"

    def the_obj(self) -> str:
        """A back-reference to the hero's object that restates the fact of the story."""
        r = self.r.random()
        if r < 0.35:
            return f"the {self.obj_color} {self.obj} that {self.hero.name} found"
        if r < 0.6:
            return f"the {self.obj_color} {self.obj}"
        return f"{self.hero.name}'s {self.obj_color} {self.obj}"

    def quote(self, speaker: Character, words: str, verb: str | None = None) -> None:
        verb = verb or ("asked" if words.endswith("?") else self.r.choice(_STATEMENT_VERBS))
        if words.endswith("."):
            words = words[:-1] + ","
        self.say(f'"{words}" {verb} {speaker.name}.', speaker)

    # ---- story parts
    def opening(self) -> None:
        h, r = self.hero, self.r
        form = r.randrange(4)
        if form == 0:
            self.say(
                f"Once upon a time, in the town of {self.town}, there lived {_article(h.trait)} {h.trait} "
                f"{h.p.kind} named {h.name}.",
                h,
            )
        elif form == 1:
            self.say(f"{h.name} was {_article(h.trait)} {h.trait} {h.p.kind} who lived in {self.town}.", h)
        elif form == 2:
            self.say(f"There was once {_article(h.trait)} {h.trait} {h.p.kind} called {h.name}.", h)
            self.say(f"{self.subj(h)} lived in a {r.choice(ADJECTIVES)} house in {self.town}.", h)
        else:
            self.say(f"In {self.town}, everyone knew {h.name}, the {h.trait} {h.p.kind}.", None)
        s = self.subj(h)
        self.say(f"{s} had {_article(self.pet_kind)} {self.pet_kind} named {self.pet_name}.", h)
        if r.random() < 0.4:
            s = self.subj(h)
            self.say(f"Every day, {s} liked to {self.hobby[0]} with {h.p.poss} {self.pet_kind}.", h)

    def find_object(self) -> None:
        h, r = self.hero, self.r
        time = r.choice(TIMES)
        self.say(
            f"{time}, {h.name} found {_article(self.obj_color)} {self.obj_color} {self.obj} near the {self.obj_place}.",
            h,
        )
        if r.random() < 0.5:
            return
        s = self.subj(h)
        feeling = r.choice(("happy", "glad", "excited", "proud", "thrilled", "amazed"))
        self.say(f"{s} {self.be(h, s)} so {feeling} that {h.p.subj} {r.choice(HANDLE_VERBS)[1]} it all day.", h)

    def arc_lost(self) -> None:
        """Problem: the found object disappears; attempts: searching places and asking the friend."""
        h, f, r = self.hero, self.friend, self.r
        self.say(f"But the next morning, {self.the_obj()} was gone!", None)
        if r.random() < 0.5:
            self.say(f"{h.name} felt {r.choice(('sad', 'worried', 'upset', 'scared'))}.", h)
        else:
            self.quote(h, f"Where is my {self.obj}?", "cried")
        places = r.sample(PLACES, 3)
        for i, place in enumerate(places[: r.randint(1, 2)]):
            verb = r.choice(SEARCH_VERBS)
            start = ("First", "Then", "Next")[i]
            self.say(f"{start}, {h.name} {verb[1]} {verb[2]} the {place}, but it was not there.", h)
        self.quote(h, f"{f.name}, have you seen my {self.obj_color} {self.obj}?")
        self.quote(f, f"I saw {self.pet_name} playing with something near the {places[-1]}.")
        if r.random() < 0.5:
            s = self.subj(f)
            self.say(f"{s} went with {h.name} to the {places[-1]}.", f)
        self.say(f"There, {self.pet_name} the {self.pet_kind} was sitting on {self.the_obj()}.", None)
        self.say(f"{h.name} laughed and hugged {h.p.poss} {self.pet_kind}.", h)
        if r.random() < 0.5:
            self.quote(h, f"Thank you, {f.name}!")
        self.moral(r.choice(MORALS[8:10] + MORALS[11:14] + MORALS[:1]))

    def arc_hungry(self) -> None:
        """Problem: the pet is hungry and there is no food; attempts: shops, trading the object."""
        h, f, r = self.hero, self.friend, self.r
        self.say(f"{r.choice(TIMES)}, {self.pet_name} the {self.pet_kind} was very hungry.", None)
        self.say(f"{h.name} looked in the kitchen, but there was no {self.food_pl} left.", h)
        if r.random() < 0.5:
            s = self.subj(h)
            self.say(f"{s} {self.be(h, s)} worried about {h.p.poss} {self.pet_kind}.", h)
        shop = r.choice(("market", "bakery", "shop", "farm", "orchard"))
        self.say(f"{h.name} ran to the {shop}, but it was closed.", h)
        self.say(f"Then {h.name} met {f.name}, {_article(f.trait)} {f.trait} {f.p.kind} from {self.town}.", h)
        self.quote(f, f"I have some {self.food_pl}. Would you trade {self.food_it} for {self.the_obj()}?")
        if r.random() < 0.5:
            s = self.subj(h)
            self.say(f"{s} thought for a long time.", h)
        if r.random() < 0.5:
            self.say(f"{h.name} gave {self.the_obj()} to {f.name}.", h)
            self.say(f"{f.name} gave {h.name} the {self.food_pl}, and {self.pet_name} ate {r.choice(ADVERBS)}.", f)
            self.say(f"{h.name} missed {h.p.poss} {self.obj}, but {h.p.subj} {h.p.be} glad.", h)
            self.moral(r.choice((MORALS[0], MORALS[3], MORALS[2])))
        else:
            self.quote(h, f"I cannot give away my {self.obj}, but I can help you at home.")
            self.say(f"So {h.name} helped {f.name} {r.choice(ACTIVITIES)[0]} all afternoon.", h)
            self.say(f"{f.name} smiled and shared the {self.food_pl} with {self.pet_name}.", f)
            self.moral(r.choice((MORALS[9], MORALS[3], MORALS[6])))

    def arc_storm(self) -> None:
        """Problem: bad weather traps the friend; attempts: the hero uses the object to help."""
        h, f, r = self.hero, self.friend, self.r
        self.say(f"{r.choice(TIMES)}, {r.choice(WEATHER)} came to {self.town}.", None)
        place = r.choice(PLACES)
        self.say(f"{f.name} was stuck at the {place} and could not get home.", f)
        if r.random() < 0.5:
            s = self.subj(f)
            self.say(f"{s} {self.be(f, s)} {r.choice(('scared', 'cold', 'worried', 'lonely'))}.", f)
        self.say(f"{h.name} heard about it and wanted to help {f.p.obj}.", h)
        attempts = r.randint(1, 2)
        for i in range(attempts):
            start = ("First", "Then", "Next")[i]
            if i == attempts - 1:
                self.say(f"{start}, {h.name} took {self.the_obj()} and walked to the {place}.", h)
            else:
                verb = r.choice(SEARCH_VERBS)
                self.say(f"{start}, {h.name} {verb[1]} {verb[2]} the {r.choice(PLACES)}, but the way was blocked.", h)
        self.say(f"{_cap(h.p.poss)} {self.pet_kind} {self.pet_name} showed {h.p.obj} a safe path.", None)
        self.quote(f, f"{h.name}, you came for me!")
        if r.random() < 0.5:
            self.quote(h, "Of course. Let's go home together.")
        self.say(f"When the sky was clear again, {h.name} and {f.name} {r.choice(ACTIVITIES)[1]} in the sun.", None)
        self.moral(r.choice((MORALS[7], MORALS[6], MORALS[9])))

    def arc_contest(self) -> None:
        """Problem: a contest in town; attempts: practice and failure; resolution: doing one's best."""
        h, f, r = self.hero, self.friend, self.r
        act = r.choice(ACTIVITIES)
        self.say(f"{r.choice(TIMES)}, the town of {self.town} held a contest to see who could {act[0]} best.", None)
        self.say(f"{h.name} wanted to win, so {h.p.subj} practiced every day with {self.the_obj()}.", h)
        self.say(f"But {f.name} practiced too, and {f.p.subj} {f.p.be} very good.", f)
        self.quote(f, f"I will {act[0]} faster than anyone!", "shouted")
        if r.random() < 0.5:
            self.say(f"{h.name} felt {r.choice(('nervous', 'worried', 'jealous', 'gloomy'))}.", h)
        s = self.subj(h)
        self.say(
            f"{s} {self.be(h, s)} about to give up when {self.pet_name} the {self.pet_kind} sat beside {h.p.obj}.", h
        )
        if r.random() < 0.5:
            self.say(f"On the day of the contest, {h.name} did {h.p.poss} best and won.", h)
            self.say(f"{h.name} shared the prize, a box of {self.food_pl}, with {f.name}.", h)
            self.moral(r.choice((MORALS[3], MORALS[4], MORALS[12])))
        else:
            self.say(f"On the day of the contest, {f.name} won, and {h.name} came second.", None)
            self.quote(h, f"Well done, {f.name}!")
            if r.random() < 0.5:
                self.quote(f, "Thank you. You were great too.")
            self.moral(r.choice((MORALS[15], MORALS[2], MORALS[4])))

    def arc_journey(self) -> None:
        """Problem: the hero wants to visit another town; attempts: the way is hard; resolution: home."""
        h, f, r = self.hero, self.friend, self.r
        other = r.choice(TOWNS)
        while other == self.town:
            other = r.choice(TOWNS)
        self.say(f"{h.name} had always wanted to visit {other}.", h)
        s = self.subj(h)
        self.say(f"{s} packed {self.the_obj()}, some {self.food_pl} and {h.p.poss} {self.pet_kind}.", h)
        if r.random() < 0.5:
            adj = r.choice(ADJECTIVES)
            self.say(
                f"The road went past {_article(adj)} {adj} {r.choice(PLACES)} and over a {r.choice(PLACES)}.", None
            )
        self.say(f"Soon {h.name} was lost and the sun was going down.", h)
        self.quote(h, f"Which way is {other}?")
        if r.random() < 0.5:
            adj = r.choice(ADJECTIVES)
            self.say(f"{_cap(_article(adj))} {adj} {r.choice(ANIMALS)} looked at {h.p.obj} but said nothing.", None)
        color, thing = r.choice(COLORS), r.choice(OBJECTS)
        while thing == self.obj:  # another kind of thing, so the hero's object stays unambiguous
            thing = r.choice(OBJECTS)
        self.say(f"Then {f.name} came along the road with {_article(color)} {color} {thing}.", f)
        s = self.subj(f)
        self.say(f"{s} knew the way and walked with {h.name} to {other}.", f)
        if r.random() < 0.5:
            self.say(f"{other} was {r.choice(('big', 'busy', 'beautiful', 'strange', 'quiet', 'noisy'))}.", None)
        self.say(f"But after a day, {h.name} missed {self.town} and went home.", h)
        self.moral(r.choice((MORALS[12], MORALS[0], MORALS[7])))

    def moral(self, lesson: str) -> None:
        h, r = self.hero, self.r
        form = r.randrange(3)
        if form == 0:
            self.say(f"From that day on, {h.name} always took good care of {self.the_obj()}.", h)
            self.say(f"{self.subj(h)} learned that {lesson}.", h)
        elif form == 1:
            self.say(f"The moral of the story is that {lesson}.", None)
        else:
            self.say(f"That night, {h.name} went to sleep {r.choice(('happy', 'smiling', 'content', 'grateful'))}.", h)
            self.say(f"{self.subj(h)} knew that {lesson}.", h)


MIN_SENTENCES, MAX_SENTENCES = 5, 15
_ARCS = (_Teller.arc_lost, _Teller.arc_hungry, _Teller.arc_storm, _Teller.arc_contest, _Teller.arc_journey)


def story_sentences(rng: random.Random) -> list[str]:
    """The sentences of one story drawn from ``rng`` (the document is them joined by spaces)."""
    while True:
        t = _Teller(rng)
        t.opening()
        arc = rng.choice(_ARCS)
        t.find_object()  # the object is a fact that every arc refers back to
        arc(t)
        if MIN_SENTENCES <= len(t.sentences) <= MAX_SENTENCES:  # rare overlong draws are redrawn
            return t.sentences


def story_rng(seed: int, index: int) -> random.Random:
    """The RNG of document ``index`` of the stream ``seed`` (independent of how many are generated)."""
    return random.Random(f"stories:{seed}:{index}")


@register_world("stories")
class StoriesWorld:
    """Short narratives (5-15 sentences) about named characters; see the module docstring."""

    name = "stories"
    version = 1  # bump when the generated text changes (invalidates cached shards)

    def documents(self, seed: int, n_docs: int | None = None) -> Iterator[str]:
        i = 0
        while n_docs is None or i < n_docs:
            yield " ".join(story_sentences(story_rng(seed, i)))
            i += 1
