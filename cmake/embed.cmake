# Turns a file into C source: a NUL-terminated `const char NAME[]` holding
# the file's bytes and `const size_t NAME_len`, its length without the NUL.
# Plain CMake, run at build time (daemon/CMakeLists.txt embeds
# docs/openapi.json this way):
#
#   cmake -DIN=file -DOUT=file.c -DNAME=symbol -P cmake/embed.cmake
foreach(var IN ITEMS IN NAME OUT)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "embed.cmake: -D${var}=... is required")
  endif()
endforeach()

file(READ "${IN}" hex HEX)
string(LENGTH "${hex}" nhex)
math(EXPR len "${nhex} / 2")
if(len EQUAL 0)
  set(hex "    \"\"")
else()
  # 32 bytes a line, each byte a \xNN escape inside a string literal (a
  # literal, not a brace list, so bytes over 0x7f need no casts).
  string(REGEX REPLACE "(................................................................)"
         "\\1\n" hex "${hex}")
  string(REGEX REPLACE "([0-9a-f][0-9a-f])" "\\\\x\\1" hex "${hex}")
  string(REGEX REPLACE "([^\n]+)" "    \"\\1\"" hex "${hex}")
endif()
get_filename_component(from "${IN}" NAME)
file(WRITE "${OUT}.tmp"
     "/* Generated from ${from} by cmake/embed.cmake: do not edit. */\n"
     "#include <stddef.h>\n\n"
     "extern const char ${NAME}[];\n"
     "extern const size_t ${NAME}_len;\n\n"
     "const char ${NAME}[] =\n${hex};\n"
     "const size_t ${NAME}_len = ${len};\n")
file(RENAME "${OUT}.tmp" "${OUT}")
