"""The method, independent of s3prl's runners: configs, teachers, aggregation, student, loss, objective."""
