"""The one base of every error a person must fix (a setting, the catalog, an unreachable
broker): its message names what is wrong and how to fix it, and the command line prints
it as one line, never a traceback."""


class TallyflowError(Exception):
    pass
