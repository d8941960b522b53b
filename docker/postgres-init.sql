-- Runs once, when the postgres volume is first initialised.
CREATE DATABASE energy;
CREATE DATABASE dagster;
