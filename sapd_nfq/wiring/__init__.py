"""What turns a site's files into running parts: the config file, who may
reach what, the engine's pieces built from a config, Postfix maps, logging
set-up, and when a changed file is due for a reload."""
