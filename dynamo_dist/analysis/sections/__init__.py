"""The report's sections, one module each; ``base.py`` says what a section is, ``report.SECTIONS`` their order."""
