"""A bank of accounts, one keyed machine instance per account, with transfers between keys."""
