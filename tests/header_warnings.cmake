# Compiles every public header on its own, included twice, with COMPILER and FLAGS (-fsyntax-only
# -Werror), the dependencies' headers as system headers, and fails naming the first header that does
# not compile alone or warns: polyak's headers must stand alone and stay quiet in users' builds under
# their strictest flags. Lists come '|'-separated.
#   cmake -DCOMPILER=... -DFLAGS=... -DINCLUDES=... -DSYSTEM_INCLUDES=... -DHEADERS=... -DWORK_DIR=... -P
foreach(_list FLAGS INCLUDES SYSTEM_INCLUDES HEADERS)
  string(REPLACE "|" ";" ${_list} "${${_list}}")
endforeach()
set(_args ${FLAGS} -fsyntax-only -Werror)
foreach(_dir IN LISTS INCLUDES)
  list(APPEND _args "-I${_dir}")
endforeach()
foreach(_dir IN LISTS SYSTEM_INCLUDES)
  list(APPEND _args -isystem "${_dir}")
endforeach()
file(MAKE_DIRECTORY "${WORK_DIR}")
foreach(_header IN LISTS HEADERS)
  file(WRITE "${WORK_DIR}/header.cpp" "#include <${_header}>\n#include <${_header}>  // and twice\n")
  execute_process(COMMAND ${COMPILER} ${_args} "${WORK_DIR}/header.cpp" RESULT_VARIABLE _result ERROR_VARIABLE _errors)
  if(_result)
    message(FATAL_ERROR "${_header} warns under ${COMPILER} ${FLAGS}:\n${_errors}")
  endif()
  message(STATUS "${_header}: quiet")
endforeach()
