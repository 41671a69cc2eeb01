package vip

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
)

// FieldError is one problem in a configuration file. Path is the field path
// (e.g. "pools[1].backends[0].weight"), empty for problems with the file as a
// whole. Line and Col are 1-based; 0 means unknown (yaml.v3 syntax errors
// carry a line but no column).
type FieldError struct {
	File      string
	Line, Col int
	Path, Msg string
}

// Error formats e as "FILE:LINE:COL: PATH: MSG", leaving out unknown
// positions and an empty path.
func (e *FieldError) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
		if e.Col > 0 {
			fmt.Fprintf(&b, ":%d", e.Col)
		}
	}
	b.WriteString(": ")
	if e.Path != "" {
		b.WriteString(e.Path + ": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Errors is every problem found in one file. Parse returns it sorted by
// position, so that a reader can fix the file from top to bottom.
type Errors []*FieldError

// Error lists the errors one per line, sorted by line and column.
func (es Errors) Error() string {
	lines := make([]string, 0, len(es))
	for _, e := range es.sorted() {
		lines = append(lines, e.Error())
	}
	return strings.Join(lines, "\n")
}

// Unwrap lets errors.As find a *FieldError.
func (es Errors) Unwrap() []error {
	errs := make([]error, len(es))
	for i, e := range es {
		errs[i] = e
	}
	return errs
}

func (es Errors) sorted() Errors {
	s := slices.Clone(es)
	slices.SortStableFunc(s, func(a, b *FieldError) int {
		return cmp.Or(cmp.Compare(a.Line, b.Line), cmp.Compare(a.Col, b.Col))
	})
	return s
}
