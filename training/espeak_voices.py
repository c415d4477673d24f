"""Every voice and every variant of espeak-ng 1.51 (Debian bookworm's), as names `espeak-ng -v` takes.

``ESPEAK_LANGUAGES``: each language voice, by the name under which a ``+variant`` suffix takes effect
(``en``, ``fr``, ``chr``: the file names, where the language code would silently drop the variant).
``ESPEAK_VARIANTS``: each voice variant (``espeak-ng --voices=variant``), as a suffix. Written out, not
listed at run time, so that a corpus plan does not depend on the espeak-ng a machine has; a name a
machine lacks fails that clip's synthesis with espeak-ng's error.
"""

ESPEAK_LANGUAGES = (
    "af", "am", "an", "ar", "as", "az", "ba", "be", "bg", "bn", "bpy", "bs", "ca", "chr", "cmn",
    "cmn-latn-pinyin", "cs", "cv", "cy", "da", "de", "el", "en-029", "en", "en-gb-scotland", "en-gb-x-gbclan",
    "en-gb-x-gbcwmd", "en-gb-x-rp", "en-us", "en-us-nyc", "eo", "es", "es-419", "et", "eu", "fa", "fa-latn", "fi",
    "fr-be", "fr-ch", "fr", "ga", "gd", "gn", "grc", "gu", "hak", "haw", "he", "hi", "hr", "ht", "hu", "hy",
    "hyw", "ia", "id", "io", "is", "it", "ja", "jbo", "ka", "kk", "kl", "kn", "ko", "kok", "ku", "ky", "la", "lb",
    "lfn", "lt", "ltg", "lv", "mi", "mk", "ml", "mr", "ms", "mt", "my", "nb", "nci", "ne", "nl", "nog", "om",
    "or", "pa", "pap", "piqd", "pl", "pt", "pt-br", "py", "qdb", "qu", "quc", "qya", "ro", "ru", "ru-lv", "sd",
    "shn", "si", "sjn", "sk", "sl", "smj", "sq", "sr", "sv", "sw", "ta", "te", "th", "tk", "tn", "tr", "tt", "ug",
    "uk", "ur", "uz", "vi", "vi-vn-x-central", "vi-vn-x-south", "yue",
)

ESPEAK_VARIANTS = (
    "+adam", "+Alex", "+Alicia", "+Andrea", "+Andy", "+Annie", "+antonio", "+aunty", "+belinda", "+benjamin",
    "+boris", "+caleb", "+david", "+Demonic", "+Denis", "+Diogo", "+ed", "+edward", "+edward2", "+Gene", "+Gene2",
    "+gustave", "+announcer", "+Henrique", "+Hugo", "+iven", "+iven2", "+iven3", "+iven4", "+Jacky", "+john",
    "+kaukovalta", "+Lee", "+linda", "+marcelo", "+Marco", "+Mario", "+max", "+Michael", "+michel", "+miguel",
    "+Mike", "+Mr", "+Nguyen", "+pablo", "+paul", "+pedro", "+quincy", "+RicishayMax", "+RicishayMax2",
    "+RicishayMax3", "+rob", "+robert", "+robosoft", "+robosoft2", "+robosoft3", "+robosoft4", "+robosoft5",
    "+robosoft6", "+robosoft7", "+robosoft8", "+steph", "+steph2", "+steph3", "+Storm", "+Tweaky", "+UniRobot",
    "+zac", "+anika", "+anikaRobot", "+AnxiousAndy", "+fast", "+f2", "+f3", "+f4", "+f5", "+whisperf", "+grandpa",
    "+klatt", "+klatt2", "+klatt3", "+klatt4", "+klatt5", "+klatt6", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7",
    "+norbert", "+sandro", "+shelby", "+travis", "+victor", "+whisper", "+m8", "+f1", "+croak", "+m1", "+grandma",
)
